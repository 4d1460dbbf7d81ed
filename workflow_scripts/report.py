"""Figures for the report: learning curves, confusion matrices, the ladder (overlay of validation
curves; the study's accuracy beside ours), Table 4's forest plot, per-class F1.

One process draws them all (matplotlib start-up is paid once):

    python workflow_scripts/plots.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --outdir results/plots
"""

from __future__ import annotations

import sys

from cnnstudy import cli, reporting

# The job: write every registry table (or those named in ``only``); return their numeric frames.
main = reporting.write_tables


HELP = {
    "models": "the resolved entries (results/specs/models.json)",
    "metrics": "metrics.json files (any number of seeds)",
    "probs": "test_probs.npz files, for Table 4's paired tests",
    "benchmarks": "Snakemake benchmark TSV files",
    "benchmark_root": "directory the benchmark paths are shown relative to",
    "only": "write only these tables (registry names)",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
