"""Figures for the report: learning curves, confusion matrices, the ladder (overlay of validation
curves; the study's accuracy beside ours), Table 4's forest plot, per-class F1.

One process draws them all (matplotlib start-up is paid once):

    python workflow_scripts/plots.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --outdir results/plots
"""

from __future__ import annotations

import argparse
import sys

from cnnstudy import cli, figures

# The job: every figure of the runs given, into outdir.
main = figures.write_all


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="JSON {model: {table, note, ...}} in table order")
    p.add_argument("--metrics", nargs="+", required=True, help="metrics.json files")
    p.add_argument("--histories", nargs="+", required=True, help="history.csv files, in the same order")
    p.add_argument("--steps", default=None, help="table4.csv, for the forest plot of Table 4")
    p.add_argument("--outdir", required=True)
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
