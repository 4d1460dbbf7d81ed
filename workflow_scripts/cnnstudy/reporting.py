"""The report's tables (cnnstudy.tables.REGISTRY) written as Markdown, CSV, LaTeX and HTML. Used by
the report rule (workflow_scripts/report.py) and by tools/publish.py."""

from __future__ import annotations

import html
import logging
from pathlib import Path

import numpy as np
import pandas as pd
from tabulate import tabulate

from . import configuration, tables
from .errors import JobError
from .files import atomic_path, read_json

log = logging.getLogger("cnnstudy.report")

FORMATS = ("md", "csv", "tex", "html")


def html_page(title: str, table_html: str, footnote: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; font-size: 0.9em; }}
th, td {{ border-bottom: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }}
th {{ background: #f3f3f3; }}
td:nth-child(2) {{ text-align: left; }}
p.note {{ max-width: 60em; color: #444; font-size: 0.85em; }}
</style></head><body>
<h2>{html.escape(title)}</h2>
{table_html}
<p class="note">{html.escape(footnote)}</p>
</body></html>
"""


def write_table(display: pd.DataFrame, numeric: pd.DataFrame, stem: Path, title: str, footnote: str) -> list[Path]:
    """Write stem.{md,csv,tex,html} atomically: the CSV holds the numbers, the others the display."""
    headers, rows = list(display.columns), display.values.tolist()
    texts = {
        "md": f"# {title}\n\n{tabulate(rows, headers, tablefmt='github', disable_numparse=True)}\n\n{footnote}\n",
        "tex": f"% {title}\n{tabulate(rows, headers, tablefmt='latex_booktabs', disable_numparse=True)}\n",
        "html": html_page(title, tabulate(rows, headers, tablefmt="html", disable_numparse=True), footnote),
    }
    written = []
    for fmt in FORMATS:
        path = stem.with_suffix(f".{fmt}")
        with atomic_path(path) as tmp:
            if fmt == "csv":
                numeric.to_csv(tmp, index=False)
            else:
                tmp.write_text(texts[fmt])
        written.append(path)
    return written


def correctness(probs: list[str]) -> dict:
    """(model, seed) -> whether each test image was classified right; every run on the same labels."""
    result, labels = {}, None
    for path in probs:
        with np.load(path) as saved:
            if labels is None:
                labels = saved["labels"]
            elif not np.array_equal(labels, saved["labels"]):
                raise JobError(f"{path}: predictions of other test images than the first run's")
            model, seed = Path(path).parent.parent.name, int(Path(path).parent.name.removeprefix("seed_"))
            result[(model, seed)] = saved["probs"].argmax(axis=1) == saved["labels"]
    return result


def write_tables(
    models: str,
    metrics: list[str],
    outdir: str,
    probs: list[str] = (),
    benchmarks: list[str] = (),
    benchmark_root: str | None = None,
    only: list[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """Write every registry table (or those named in ``only``); return their numeric frames."""
    info = configuration.complete(read_json(models))
    missing = [path for path in [*metrics, *probs] if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"missing input file(s): {', '.join(missing)}")
    loaded = [read_json(path) for path in metrics]
    unknown = sorted({m["model"] for m in loaded} - set(info))
    if unknown:
        raise JobError(f"metrics for model(s) not in {models}: {', '.join(unknown)}")
    inputs = tables.Inputs(
        info, tables.per_run(loaded), loaded, correctness(list(probs)), list(benchmarks), benchmark_root
    )
    written = {}
    for table in tables.wanted(info):
        if only is not None and table.name not in only:
            continue
        numeric, columns, footnote = table.build(inputs)
        write_table(tables.display(numeric, columns), numeric, Path(outdir) / table.name, table.title, footnote)
        log.info("%s: %d row(s) -> %s", table.name, len(numeric), Path(outdir) / f"{table.name}.*")
        written[table.name] = numeric
    return written
