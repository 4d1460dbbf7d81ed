"""The report's tables: every table of the registry (cnnstudy/tables.py: Tables 1-4, provenance,
benchmarks, sweeps, compare, protocols where such runs exist) as Markdown, CSV, LaTeX and HTML.

    python workflow_scripts/report.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --probs results/metrics/*/seed_*/test_probs.npz \\
        --benchmarks results/benchmarks/preprocess.tsv results/benchmarks/*/*/seed_*.tsv \\
        --benchmark-root results/benchmarks --outdir reports
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
