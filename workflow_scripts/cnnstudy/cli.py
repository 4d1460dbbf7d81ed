"""Command-line plumbing shared by the job scripts.

Each script has a ``main()`` with plain arguments (what the tests call); its command line
(what the Snakemake rules call) is derived from that signature by ``parser_for()``: one flag per
parameter, so a rule's shell command and the function it runs name the same arguments, and
tests/test_workflow_static.py checks every rule's flags against them. Expected failures (bad
data, bad config, NaN loss) end the job with one ``ERROR:`` line naming the problem instead of
a traceback; anything else keeps its traceback.
"""

from __future__ import annotations

import argparse
import inspect
import logging
import os
import sys
import types
import typing
from collections.abc import Callable, Mapping

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


# help= value of an argument that scripts pass among themselves, hidden from --help.
HIDDEN = argparse.SUPPRESS


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"


def _optional(convert: Callable[[str], object]) -> Callable[[str], object]:
    """``convert``, with "none", "null" or "" read as None (a rule passes an unset setting so)."""
    return lambda text: None if text.lower() in ("", "none", "null") else convert(text)


def _union(hint) -> tuple:
    """The members of ``X | Y`` (one member: ``(hint,)``)."""
    return typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)


def _argument(name: str, hint, default) -> dict:
    """argparse keywords for a parameter of type ``hint`` with ``default`` (inspect.Parameter.empty: required)."""
    options = {"required": True} if default is inspect.Parameter.empty else {"default": default}
    members = [m for m in _union(hint) if m is not type(None)]
    optional = len(members) < len(_union(hint))
    hint = str if str in members else members[0]  # str | dict: a path on the command line
    if typing.get_origin(hint) in (list, tuple):
        hint = typing.get_args(hint)[0]
        options["nargs"] = "+" if options.get("required") else "*"
        if isinstance(default, tuple):
            options["default"] = list(default)
    if typing.get_origin(hint) is typing.Literal:
        options["choices"] = list(typing.get_args(hint))
        hint = type(options["choices"][0])
    if hint is bool:
        options["type"], options["metavar"] = _bool, "true|false"
    elif hint in (int, float):
        options["type"] = hint
    elif hint is not str:
        raise TypeError(f"{name}: {hint!r} cannot come from a command line (give it a default and leave it to callers)")
    if optional and "type" in options:
        options["type"] = _optional(options["type"])
    return options


def parser_for(
    function: Callable[..., object], help: Mapping[str, str] | None = None, description: str | None = None
) -> argparse.ArgumentParser:
    """The command line of ``function``: ``--some-name`` for each parameter ``some_name``, required
    where it has no default; types from its annotations (int, float, str, bool as true|false,
    Literal as choices, list as several values, X | None also accepting "none"). A parameter
    whose type a command line cannot give (a dict) and that has a default is left to callers.
    ``help``: text per parameter name (HIDDEN hides it); a name that is not a parameter is an error."""
    signature = inspect.signature(function)
    hints = typing.get_type_hints(function)
    help = dict(help or {})
    if unknown := set(help) - set(signature.parameters):
        raise TypeError(f"help for {sorted(unknown)}: not parameters of {function.__qualname__}")
    description = description if description is not None else inspect.getdoc(function)
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    for name, param in signature.parameters.items():
        hint = hints.get(name, str)
        dict_only = all(m is type(None) or m is dict or typing.get_origin(m) is dict for m in _union(hint))
        if dict_only and param.default is not inspect.Parameter.empty:
            continue
        p.add_argument(f"--{name.replace('_', '-')}", help=help.get(name), **_argument(name, hint, param.default))
    return p


def run(
    main: Callable[..., object],
    parser: argparse.ArgumentParser | None = None,
    argv: list[str] | None = None,
    unused: tuple[str, ...] = (),
    help: Mapping[str, str] | None = None,
) -> int:
    """Parse ``argv`` (with ``parser``, by default the one derived from ``main``'s signature), call
    ``main(**args)`` and turn expected failures into exit code 1.

    ``unused``: optional packages this job never imports itself, refused before TensorFlow or Keras
    would import them at start-up (runtime.STARTUP_EXTRAS)."""
    from . import runtime

    runtime.refuse_imports(unused)
    setup_logging()
    if parser is None:
        parser = parser_for(main, help, description=inspect.getdoc(sys.modules["__main__"]))
    args = vars(parser.parse_args(argv))
    try:
        main(**args)
    except (JobError, ConfigError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 1
    return 0
