"""Compare runs side by side in the terminal: only the settings that differ, sorted by any metric.

    python tools/compare.py --results results                      # every entry
    python tools/compare.py --results results --sweep model10_claims --sort test_accuracy
    python tools/compare.py --results results --models 'model_10*' 'model_17' --sort val_loss --ascending

Reads a results directory (specs/models.json and the metrics files), never trains.
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
from pathlib import Path

from tabulate import tabulate

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))  # the workflow's cnnstudy package

from cnnstudy import cli, configuration, tables
from cnnstudy.errors import JobError
from cnnstudy.files import read_json


def main(
    results: str,
    models: list[str] | None = None,
    sweep: str | None = None,
    sort: str = "val_accuracy",
    ascending: bool = False,
) -> str:
    info = configuration.complete(read_json(Path(results) / "specs" / "models.json"))
    metrics = [read_json(p) for p in sorted(Path(results).glob("metrics/*/seed_*/metrics.json"))]
    if not metrics:
        raise JobError(f"no finished runs under {results}/metrics")
    names = [
        n
        for n in info
        if (not models or any(fnmatch.fnmatch(n, p) for p in models)) and (not sweep or info[n].get("sweep") == sweep)
    ]
    try:
        frame, differ = tables.compare_frame(info, tables.per_run(metrics), names, sort, ascending)
    except KeyError as exc:
        raise JobError(str(exc.args[0])) from exc
    if frame.empty:
        raise JobError(f"no finished runs among {', '.join(models or [])} {sweep or ''}".strip())
    shown = tables.display(frame, tables.compare_columns(differ))
    text = tabulate(shown.values.tolist(), list(shown.columns), tablefmt="github", disable_numparse=True)
    print(text)
    return text


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", default="results", help="a results directory")
    p.add_argument("--models", nargs="*", default=None, help="entry names or shell patterns (default: all)")
    p.add_argument("--sweep", default=None, help="only the points of this sweep")
    p.add_argument(
        "--sort", default="val_accuracy", help=f"a metric ({', '.join(tables.COMPARE_METRICS)}) or a setting"
    )
    p.add_argument("--ascending", action="store_true")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
