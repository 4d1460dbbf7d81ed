"""Figures for the report: learning curves, confusion matrices, the ladder (overlay of validation
curves; the study's accuracy beside ours), Table 4's forest plot, per-class F1.

One process draws them all (matplotlib start-up is paid once):

    python workflow_scripts/plots.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --histories results/models/*/seed_*/history.csv \\
        --steps reports/table4.csv --outdir results/plots
"""

from __future__ import annotations

import sys

from cnnstudy import cli, figures

# The job: every figure of the runs given, into outdir.
main = figures.write_all


HELP = {
    "models": "JSON {model: {table, note, ...}} in table order",
    "metrics": "metrics.json files",
    "histories": "history.csv files, in the same order",
    "steps": "table4.csv, for the forest plot of Table 4",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
