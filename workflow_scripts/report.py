"""Aggregate every model's metrics into the report tables (Markdown, CSV, LaTeX, HTML).

Table 1 holds the custom CNNs (the study's ladder), Table 2 the transfer-learning models:
one row per model in config order, mean ± std over seeds (n shown), and the study's
published numbers beside ours.

    python workflow_scripts/report.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --outdir reports
"""

from __future__ import annotations

import argparse
import html
import logging
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from cnnstudy import cli
from cnnstudy.io import atomic_path, read_json

log = logging.getLogger("cnnstudy.report")

FORMATS = ("md", "csv", "tex", "html")

# Per-seed quantities: column label, how to read it from a metrics file, digits.
QUANTITIES = {
    "accuracy": ("Accuracy", lambda m: m["kept_epoch"]["accuracy"], 4),
    "loss": ("Loss", lambda m: m["kept_epoch"]["loss"], 4),
    "val_accuracy": ("Val. accuracy", lambda m: m["kept_epoch"]["val_accuracy"], 4),
    "val_loss": ("Val. loss", lambda m: m["kept_epoch"]["val_loss"], 4),
    "test_accuracy": ("Test accuracy", lambda m: m["test"]["accuracy"], 4),
    "test_loss": ("Test loss", lambda m: m["test"]["loss"], 4),
    "f1_macro": ("Test macro F1", lambda m: m["test"]["f1_macro"], 4),
    "epochs_run": ("Epochs", lambda m: m["epochs_run"], 1),
    "train_seconds": ("Train time (s)", lambda m: m["train_seconds"], 0),
}
STUDY = ("accuracy", "loss", "val_accuracy", "val_loss")  # the study's columns

TITLES = {
    1: "Table 1 - Custom CNNs (the study's ladder)",
    2: "Table 2 - Transfer learning",
}
FOOTNOTE = (
    "Accuracy, loss, val. accuracy and val. loss are Keras' training history at the kept epoch "
    "(the best validation loss when early stopping restores weights, else the last); train "
    "accuracy is measured with dropout and augmentation active. Our validation set is a stratified "
    "10 % of the training images; the study validated on the CIFAR-10 test set. Test columns are "
    "our untouched test set (scikit-learn). Values are mean ± standard deviation over n seeds; "
    "the study reported single runs. '(study)' columns are the study's published numbers."
)


def per_seed(metrics_files: list[str]) -> pd.DataFrame:
    """One row per (model, seed) with the numeric quantities."""
    rows = []
    for path in metrics_files:
        m = read_json(path)
        rows.append({"model": m["model"], "seed": m["seed"], **{k: get(m) for k, (_, get, _) in QUANTITIES.items()}})
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean, std (ddof=1; empty for one seed) and n per model, in ``order``."""
    grouped = runs.groupby("model")[list(QUANTITIES)]
    stats = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1)}, axis=1)
    stats.columns = [f"{q}_{stat}" for stat, q in stats.columns]
    stats["n"] = runs.groupby("model")["seed"].nunique()
    return stats.reindex([m for m in order if m in stats.index])


def cell(mean: float, std: float, digits: int) -> str:
    if pd.isna(mean):
        return ""
    text = f"{mean:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{digits}f}"


def build_table(stats: pd.DataFrame, models: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(display table of strings, numeric table for CSV)."""
    display, numeric = [], []
    for name, row in stats.iterrows():
        published = models[name].get("published") or {}
        shown = {"Model": name, "Change": models[name].get("note", "")}
        values = {"model": name, "note": models[name].get("note", ""), "n": int(row["n"])}
        for key, (label, _, digits) in QUANTITIES.items():
            shown[label] = cell(row[f"{key}_mean"], row[f"{key}_std"], digits)
            values[f"{key}_mean"], values[f"{key}_std"] = row[f"{key}_mean"], row[f"{key}_std"]
            if key in STUDY:
                study = published.get(key)
                shown[f"{label} (study)"] = "" if study is None else f"{study:.4f}"
                values[f"{key}_study"] = study
        shown["n"] = int(row["n"])
        display.append(shown)
        numeric.append(values)
    return pd.DataFrame(display), pd.DataFrame(numeric)


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
    """Write stem.{md,csv,tex,html} atomically."""
    headers = list(display.columns)
    rows = display.values.tolist()
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


def main(models: str, metrics: list[str], outdir: str, tables: list[int] = (1, 2)) -> dict[int, pd.DataFrame]:
    """Write table<N>.{md,csv,tex,html} into ``outdir`` for every N in ``tables``."""
    info = read_json(models)
    missing = [path for path in metrics if not Path(path).is_file()]
    if missing:
        raise FileNotFoundError(f"missing metrics file(s): {', '.join(missing)}")
    runs = per_seed(metrics)
    unknown = sorted(set(runs["model"]) - set(info)) if len(runs) else []
    if unknown:
        raise cli.JobError(f"metrics for model(s) not in {models}: {', '.join(unknown)}")
    stats = aggregate(runs, list(info)) if len(runs) else pd.DataFrame()
    result = {}
    for number in tables:
        members = [name for name, m in info.items() if m.get("table") == number]
        display, numeric = build_table(stats.reindex([m for m in members if m in stats.index]), info)
        if display.empty:
            display = pd.DataFrame(columns=["Model"])
        write_table(display, numeric, Path(outdir) / f"table{number}", TITLES[number], FOOTNOTE)
        log.info("table %d: %d model(s) -> %s", number, len(display), Path(outdir) / f"table{number}.*")
        result[number] = numeric
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="JSON {model: {table, note, published}} in table order")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.json files (any number of seeds)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--tables", nargs="+", type=int, default=[1, 2])
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
