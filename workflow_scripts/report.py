"""Aggregate every model's metrics into the report tables (Markdown, CSV, LaTeX, HTML).

Table 1 holds the custom CNNs (the study's ladder), Table 2 the transfer-learning models:
one row per model in config order, mean ± std over seeds (n shown), and the study's
published numbers beside ours. Table 3 is the annex: what each model changes and how big
it is, generated from the resolved config and the trained models. Provenance and the
jobs' benchmarks are summarised too.

    python workflow_scripts/report.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --outdir reports
"""

from __future__ import annotations

import argparse
import collections
import html
import logging
import sys
from pathlib import Path

import pandas as pd
from tabulate import tabulate

from cnnstudy import cli, provenance
from cnnstudy.io import atomic_path, read_json

log = logging.getLogger("cnnstudy.report")

FORMATS = ("md", "csv", "tex", "html")

# Per-seed quantities: column label, how to read it from a metrics file, digits.
QUANTITIES = {
    "accuracy": ("Train accuracy", lambda m: m["kept_epoch"]["accuracy"], 4),
    "loss": ("Train loss", lambda m: m["kept_epoch"]["cross_entropy"], 4),
    "val_accuracy": ("Val. accuracy", lambda m: m["val"]["accuracy"], 4),
    "val_loss": ("Val. loss", lambda m: m["val"]["loss"], 4),
    "test_accuracy": ("Test accuracy", lambda m: m["test"]["accuracy"], 4),
    "test_loss": ("Test loss", lambda m: m["test"]["loss"], 4),
    "f1_macro": ("Test macro F1", lambda m: m["test"]["f1_macro"], 4),
    "epochs_run": ("Epochs", lambda m: m["epochs_run"], 1),
    "train_seconds": ("Train time (s)", lambda m: m["train_seconds"], 0),
    "time_to_087": ("Time to 0.87 test acc. (s)", lambda m: time_to(m, 0.87), 0),
    "time_to_094": ("Time to 0.94 test acc. (s)", lambda m: time_to(m, 0.94), 0),
}
# Shown only in tables where some model has them (entries with time_to_accuracy: true).
OPTIONAL = ("time_to_087", "time_to_094")
STUDY = ("accuracy", "loss", "val_accuracy", "val_loss")  # the study's columns

TITLES = {
    1: "Table 1 - Custom CNNs (the study's ladder)",
    2: "Table 2 - Transfer learning",
    3: "Table 3 - The models: what changes from rung to rung",
}
OWN_KEYS = ("name", "base", "note", "published", "table", "seeds", "compare_to", "claim")
STALE = "†"
FOOTNOTE = (
    "Train accuracy and train loss: Keras' running means over the batches of the kept epoch (the "
    "best validation loss when early stopping restores weights, else the last), in training mode "
    "(augmentation and dropout active, raw weights), as the study's numbers were measured; the loss "
    "is categorical cross-entropy without label smoothing. Val. and test columns: the final model "
    "as evaluated (its weight average where the entry keeps one, its test-time augmentation where it "
    "has one) on our validation split (a stratified 10 % of the training images, also the one early "
    "stopping watches) and on the untouched CIFAR-10 test set: accuracy, and the categorical "
    "cross-entropy (scikit-learn log loss, no label smoothing) of the same probabilities. The study "
    "validated on the test set; its '(study)' columns are its published numbers, its loss Keras' "
    "training loss. Values are mean ± standard deviation over n seeds; the study reported single "
    "runs. Time-to-accuracy columns (models that record it): training seconds, validation excluded, "
    "until the model as evaluated, measured after every epoch, first reached the target test "
    "accuracy; blank where it never did. "
    f"{STALE} after a model name: trained by code that differs from the current code (its training "
    "code hash, in the provenance table); rerun it before citing the number."
)


def time_to(metrics: dict, target: float) -> float:
    """Training seconds until the evaluated model's test accuracy first reached ``target``; NaN if never.

    One kind of point throughout: the model as it is evaluated (weight average, TTA), after
    every epoch; the last point is the final model.
    """
    for point in metrics.get("time_to_accuracy") or []:
        if point["test_accuracy"] >= target:
            return point["train_seconds"]
    return float("nan")


CURRENT_CODE = provenance.code_hash("train.py")


def _code(metrics: dict) -> dict:
    return (metrics.get("provenance") or {}).get("training") or {}


def per_seed(metrics_files: list[str]) -> pd.DataFrame:
    """One row per (model, seed) with the numeric quantities."""
    rows = []
    for path in metrics_files:
        m = read_json(path)
        rows.append(
            {
                "model": m["model"],
                "seed": m["seed"],
                **{k: get(m) for k, (_, get, _) in QUANTITIES.items()},
                "params": m["params"],
                "layers": m["layers"],
                "provenance": m.get("provenance", {}),
                "stale": _code(m).get("code_hash") != CURRENT_CODE,
            }
        )
    return pd.DataFrame(rows)


def aggregate(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean, std (ddof=1; empty for one seed) and n per model, in ``order``."""
    grouped = runs.groupby("model")[list(QUANTITIES)]
    stats = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1)}, axis=1)
    stats.columns = [f"{q}_{stat}" for stat, q in stats.columns]
    stats["n"] = runs.groupby("model")["seed"].nunique()
    stats["stale"] = runs.groupby("model")["stale"].any()
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
        shown = {"Model": name + (f" {STALE}" if row["stale"] else ""), "Change": models[name].get("note", "")}
        values = {"model": name, "note": models[name].get("note", ""), "n": int(row["n"]), "trained_by_other_code": bool(row["stale"])}
        for key, (label, _, digits) in QUANTITIES.items():
            if key in OPTIONAL and not any(models[n].get("time_to_accuracy") for n in stats.index):
                continue
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


# ---- Table 3: the annex ------------------------------------------------------------------


def _flatten(spec: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in spec.items():
        if not prefix and key in OWN_KEYS:
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _layer_names(items) -> list[str]:
    names = []
    for item in items or []:
        names.extend(_layer_names(item) if isinstance(item, list) else list(item))
    return names


def _show(key: str, value) -> str:
    if key in ("layers", "augmentation"):
        names = _layer_names(value)
        return ", ".join(names) if key == "augmentation" and names else f"{len(names)} layers" if names else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def describe_change(spec: dict, base: dict | None) -> str:
    """What the entry changes from its `base`, computed from the resolved config."""
    if base is None:
        return "(first model of its line)"
    # A setting that appears or disappears as a whole (e.g. early stopping) is one change.
    whole = {k for k in {**base, **spec} if k not in OWN_KEYS and isinstance(base.get(k), dict) != isinstance(spec.get(k), dict)}
    old = {**_flatten({k: v for k, v in base.items() if k not in whole}), **{k: base.get(k) for k in whole}}
    new = {**_flatten({k: v for k, v in spec.items() if k not in whole}), **{k: spec.get(k) for k in whole}}
    changes = []
    for key in [k for k in {**old, **new} if old.get(k) != new.get(k)]:
        text = f"{key}: {_show(key, old.get(key))} → {_show(key, new.get(key))}"
        if key == "layers":
            before, after = collections.Counter(_layer_names(old.get(key))), collections.Counter(_layer_names(new.get(key)))
            delta = [f"+{n}×{k}" for k, n in (after - before).items()] + [f"-{n}×{k}" for k, n in (before - after).items()]
            text += f" ({', '.join(delta) or 'same layers, new arguments'})"
        changes.append(text)
    return "; ".join(changes) or "(no change)"


def table3(stats: pd.DataFrame, runs: pd.DataFrame, models: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    display, numeric = [], []
    sizes = runs.groupby("model")[["params", "layers"]].first()
    for name, row in stats.iterrows():
        spec = models[name]
        base = models.get(spec.get("base")) if spec.get("base") else None
        opt = spec["optimizer"]
        backbone = spec.get("backbone")
        values = {
            "model": name,
            "note": spec.get("note", ""),
            "changes": describe_change(spec, base),
            "backbone": f"{backbone['name']} ({backbone.get('weights', 'imagenet')}, {backbone.get('trainable', 'frozen')})" if backbone else "",
            "layers": int(sizes.loc[name, "layers"]),
            "params": int(sizes.loc[name, "params"]),
            "optimizer": opt["name"],
            "learning_rate": opt["learning_rate"],
            "batch_size": spec["batch_size"],
            "augmentation": ", ".join(_layer_names(spec.get("augmentation"))) or "none",
            "epochs_run_mean": row["epochs_run_mean"],
            "epochs_run_std": row["epochs_run_std"],
            "train_seconds_mean": row["train_seconds_mean"],
            "train_seconds_std": row["train_seconds_std"],
            "n": int(row["n"]),
        }  # fmt: skip
        numeric.append(values)
        display.append(
            {
                "Model": name,
                "Study's change": values["note"],
                "What changed (from config)": values["changes"],
                "Backbone": values["backbone"],
                "Layers": values["layers"],
                "Parameters": f"{values['params']:,}",
                "Optimizer": values["optimizer"],
                "Learning rate": f"{values['learning_rate']:g}",
                "Batch size": values["batch_size"],
                "Augmentation": values["augmentation"],
                "Epochs": cell(row["epochs_run_mean"], row["epochs_run_std"], 1),
                "Train time (s)": cell(row["train_seconds_mean"], row["train_seconds_std"], 0),
                "n": values["n"],
            }
        )
    return pd.DataFrame(display), pd.DataFrame(numeric)


TABLE3_NOTE = (
    "Layers counts Keras' model.layers (input, augmentation and output layers included; a "
    "backbone counts as one); Parameters is model.count_params() of the trained model. "
    "'What changed' compares each resolved entry with the entry it names as base."
)


# ---- provenance and benchmarks ------------------------------------------------------------


def provenance_table(runs: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, run in runs.iterrows():
        p = run["provenance"]
        trained = p.get("training") or {}
        packages = trained.get("packages") or {}
        device = p.get("device") or {}
        commit = trained.get("git_commit") or ""
        rows.append(
            {
                "Model": run["model"],
                "Seed": run["seed"],
                "Device": f"{device.get('kind', '')} {device.get('name', '')}".strip(),
                "Precision": p.get("precision"),
                "Threads": (p.get("threads") or {}).get("intra_op"),
                "TensorFlow": packages.get("tensorflow"),
                "Keras": packages.get("keras"),
                "NumPy": packages.get("numpy"),
                "Config hash": p.get("spec_hash"),
                "Data md5": (p.get("data") or {}).get("npz_md5"),
                "Trained at commit": commit[:12] + ("-dirty" if trained.get("git_dirty") else ""),
                "Training code": trained.get("code_hash"),
                "Code now": "differs " + STALE if run["stale"] else "same",
            }
        )
    return pd.DataFrame(rows)


def benchmark_table(paths: list[str], root: str | None) -> pd.DataFrame:
    """Snakemake's benchmark TSVs: wall time and peak memory per job."""
    rows = []
    for path in paths:
        bench = pd.read_csv(path, sep="\t")
        job = Path(path).relative_to(root).with_suffix("").as_posix() if root else Path(path).stem
        rows.append({"Job": job, "Wall time (s)": round(float(bench["s"].iloc[-1]), 1), "Peak RSS (MB)": round(float(bench["max_rss"].iloc[-1]), 0)})  # fmt: skip
    return pd.DataFrame(rows)


def main(
    models: str,
    metrics: list[str],
    outdir: str,
    tables: list[int] = (1, 2),
    benchmarks: list[str] = (),
    benchmark_root: str | None = None,
) -> dict[int, pd.DataFrame]:
    """Write table<N>.{md,csv,tex,html} for every N in ``tables``, table3, provenance and benchmarks."""
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
    display, numeric = table3(stats, runs, info)
    write_table(display, numeric, Path(outdir) / "table3", TITLES[3], TABLE3_NOTE)
    result[3] = numeric
    prov = provenance_table(runs)
    write_table(prov, prov, Path(outdir) / "provenance", "Provenance of every result", "One row per model and seed, from its metrics file. Training code: hash of train.py and the cnnstudy package when the model was trained; Code now: whether the current code hashes the same.")  # fmt: skip
    bench = benchmark_table(list(benchmarks), benchmark_root)
    write_table(bench, bench, Path(outdir) / "benchmarks", "Benchmarks: wall time and peak memory per job", "From Snakemake's benchmark: files (max_rss is the peak resident memory).")  # fmt: skip
    log.info("table 3, provenance (%d runs) and benchmarks (%d jobs) written", len(prov), len(bench))
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True, help="JSON {model: {table, note, published}} in table order")
    p.add_argument("--metrics", nargs="*", default=[], help="metrics.json files (any number of seeds)")
    p.add_argument("--outdir", required=True)
    p.add_argument("--tables", nargs="+", type=int, default=[1, 2])
    p.add_argument("--benchmarks", nargs="*", default=[], help="Snakemake benchmark TSV files")
    p.add_argument("--benchmark-root", default=None, help="directory the benchmark paths are shown relative to")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
