"""Figures for the report: learning curves, confusion matrices, the ladder (overlay of validation
curves; the study's accuracy beside ours), Table 4's forest plot, per-class F1.

One process draws them all (matplotlib start-up is paid once):

    python workflow_scripts/plots.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --outdir results/plots
"""

from __future__ import annotations

import argparse
import sys

from cnnstudy import cli, reporting

# The job: write every registry table (or those named in ``only``); return their numeric frames.
main = reporting.write_tables


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="the resolved entries (results/specs/models.json)")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.json files (any number of seeds)")
    p.add_argument("--probs", nargs="*", default=[], help="test_probs.npz files, for Table 4's paired tests")
    p.add_argument("--outdir", required=True)
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark TSV files")
    p.add_argument("--benchmark-root", default=None, help="directory the benchmark paths are shown relative to")
    p.add_argument("--only", nargs="+", default=None, help="write only these tables (registry names)")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
