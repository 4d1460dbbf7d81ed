"""Command-line plumbing shared by the job scripts.

Each script has a ``main()`` with plain arguments (what the tests call) and a thin
argparse front end (what the Snakemake rules call). Expected failures (bad data, bad
config, NaN loss) end the job with one ``ERROR:`` line naming the problem instead of a
traceback; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable

from .errors import ConfigError, JobError

log = logging.getLogger("cnnstudy")


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%Y-%m-%d %H:%M:%S",
        stream=sys.stderr,
        force=True,
    )
    # TensorFlow's C++ start-up chatter (CUDA probing on CPU machines) is noise in job logs.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def run(main: Callable[..., object], parser: argparse.ArgumentParser, argv: list[str] | None = None,
        unused: tuple[str, ...] = ()) -> int:  # fmt: skip
    """Parse ``argv``, call ``main(**args)`` and turn expected failures into exit code 1.

    ``unused``: optional packages this job never imports itself, refused before TensorFlow or Keras
    would import them at start-up (runtime.STARTUP_EXTRAS)."""
    from . import runtime

    runtime.refuse_imports(unused)
    setup_logging()
    args = vars(parser.parse_args(argv))
    try:
        main(**args)
    except (JobError, ConfigError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0
