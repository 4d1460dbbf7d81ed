"""The report's tables: one registry, read by the rules (which files) and by report.py (how).

A table is one ``Table`` in ``REGISTRY``: its file name, title, caption file
(reports/captions/<caption>.rst), and a builder that returns a numeric
DataFrame (what the CSV holds), the columns to show (label, digits, the column holding the
± spread) and its footnote. ``display`` is the one formatting pass for Markdown, LaTeX and
HTML. Adding a table is one entry here and its caption file.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from . import configuration, protocols, provenance, stats

STALE = "†"


@dataclass(frozen=True)
class Column:
    key: str  # numeric column (CSV)
    label: str  # header shown
    digits: int | None = None  # None: shown as is
    spread: str | None = None  # numeric column shown after ±
    show: Callable[[pd.Series], str] | None = None  # a cell built from several columns


@dataclass
class Inputs:
    """Everything a builder may read: the resolved entries, one row per run, the raw metrics,
    the test-set predictions (for paired tests) and the jobs' benchmark files."""

    models: dict
    runs: pd.DataFrame
    metrics: list[dict]
    probs: dict = field(default_factory=dict)  # (model, seed) -> per-image correctness
    benchmarks: list[str] = field(default_factory=list)
    benchmark_root: str | None = None


@dataclass(frozen=True)
class Table:
    name: str
    title: str
    caption: str
    build: Callable[[Inputs], tuple[pd.DataFrame, list[Column], str]]
    wanted: Callable[[dict], bool] = lambda models: True  # written for these entries (else not an output)


# ---- per-run quantities --------------------------------------------------------------------------

NO_VAL = {"accuracy": float("nan"), "loss": float("nan")}  # a run trained on the validation images
# key: (label, how to read it from a metrics file, digits)
QUANTITIES = {
    "accuracy": ("Train accuracy", lambda m: m["kept_epoch"]["accuracy"], 4),
    "loss": ("Train loss", lambda m: m["kept_epoch"]["cross_entropy"], 4),
    "val_accuracy": ("Val. accuracy", lambda m: (m["val"] or NO_VAL)["accuracy"], 4),  # refit, study: none
    "val_loss": ("Val. loss", lambda m: (m["val"] or NO_VAL)["loss"], 4),
    "test_accuracy": ("Test accuracy", lambda m: m["test"]["accuracy"], 4),
    "test_loss": ("Test loss", lambda m: m["test"]["loss"], 4),
    "f1_macro": ("Test macro F1", lambda m: m["test"]["f1_macro"], 4),
    "epochs_run": ("Epochs", lambda m: m["epochs_run"], 1),
    "train_seconds": ("Train time (s)", lambda m: m["train_seconds"], 0),
    "time_to_087": ("Time to 0.87 test acc. (s)", lambda m: time_to(m, 0.87), 0),
    "time_to_094": ("Time to 0.94 test acc. (s)", lambda m: time_to(m, 0.94), 0),
    "images_to_094": ("Images to 0.94 test acc.", lambda m: time_to(m, 0.94, "images"), 0),
}
OPTIONAL = ("time_to_087", "time_to_094", "images_to_094")  # shown where some entry records time to accuracy
STUDY = ("accuracy", "loss", "val_accuracy", "val_loss")  # the study's published columns


def time_to(metrics: dict, target: float, unit: str = "train_seconds") -> float:
    """Training seconds (or images seen) until the evaluated model's test accuracy first reached
    ``target``; NaN if never.

    One kind of point throughout: the model as it is evaluated (weight average, TTA), after
    every epoch; the last point is the final model.
    """
    for point in metrics.get("time_to_accuracy") or []:
        if point["test_accuracy"] >= target:
            return point.get(unit, float("nan"))
    return float("nan")


def checks_with(record: dict, stage: str, code: str) -> list[dict]:
    """The verify_published checks recorded in a result's provenance that vouch for its ``stage``
    code ("training" or "evaluation") hashing as ``code``."""
    return [v for v in record.get("verified") or [] if (v.get("code_hashes") or {}).get(stage) == code]


def code_status(record: dict, stage: str, current: str) -> str:
    """Whether a result's ``stage`` code ("training" or "evaluation") is the ``current`` code:
    "same" (it hashes the same), "verified" (it differs, but verify_published checked the result
    with code that hashes as ``current``) or "differs"."""
    if (record.get(stage) or {}).get("code_hash") == current:
        return "verified" if (record.get(stage) or {}).get("original") else "same"
    if checks_with(record, stage, current):
        return "verified"
    return "differs"


def per_run(metrics: list[dict]) -> pd.DataFrame:
    """One row per (model, seed): the quantities, sizes, provenance, whether other code trained it."""
    current = {"training": provenance.code_hash("train.py"), "evaluation": provenance.code_hash("evaluate.py")}
    rows = [
        {
            "model": m["model"],
            "seed": m["seed"],
            **{key: get(m) for key, (_, get, _) in QUANTITIES.items()},
            "params": m["params"],
            "layers": m["layers"],
            "protocol": (m.get("protocol") or {}).get("name", protocols.DEFAULT),
            "provenance": m["provenance"],
            "training_code": code_status(m["provenance"], "training", current["training"]),
            "evaluation_code": code_status(m["provenance"], "evaluation", current["evaluation"]),
        }
        for m in metrics
    ]
    runs = pd.DataFrame(rows)
    if len(runs):
        runs["stale"] = runs["training_code"] == "differs"
    return runs


def aggregate(runs: pd.DataFrame, order: list[str]) -> pd.DataFrame:
    """Mean, std (ddof=1; empty for one seed) and n per model, in ``order``."""
    grouped = runs.groupby("model")[list(QUANTITIES)]
    result = pd.concat({"mean": grouped.mean(), "std": grouped.std(ddof=1)}, axis=1)
    result.columns = [f"{q}_{stat}" for stat, q in result.columns]
    result["n"] = runs.groupby("model")["seed"].nunique()
    result["stale"] = runs.groupby("model")["stale"].any()
    return result.reindex([m for m in order if m in result.index])


def cell(mean, std=np.nan, digits: int | None = None) -> str:
    if isinstance(mean, str) or digits is None:
        return "" if mean is None or (isinstance(mean, float) and np.isnan(mean)) else str(mean)
    if pd.isna(mean):
        return ""
    text = f"{mean:.{digits}f}"
    return text if pd.isna(std) else f"{text} ± {std:.{digits}f}"


def display(numeric: pd.DataFrame, columns: list[Column]) -> pd.DataFrame:
    """The one formatting pass: numbers to text (mean ± spread, fixed digits)."""

    def one(c: Column, row: pd.Series) -> str:
        return c.show(row) if c.show else cell(row[c.key], row[c.spread] if c.spread else np.nan, c.digits)

    shown = {c.label: [one(c, row) for _, row in numeric.iterrows()] for c in columns}
    return pd.DataFrame(shown, columns=[c.label for c in columns])


# ---- Tables 1 and 2: the study's numbers beside ours ----------------------------------------------

LADDER_NOTE = (
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
    "or training images seen, until the model as evaluated, measured after every epoch, first reached "
    "the target test accuracy; blank where it never did. "
    f"{STALE} after a model name: trained by code that differs from the current training code (the "
    "hash of what the train script imports, in the provenance table) and not verified against it "
    "(make verify-published); verify or rerun it before citing the number."
)


def ladder_table(number: int):
    def build(inputs: Inputs):
        members = [n for n, e in inputs.models.items() if e["table"] == number and configuration.in_study_tables(e)]
        agg = aggregate(inputs.runs, members) if len(inputs.runs) else pd.DataFrame()
        timed = any(inputs.models[n]["time_to_accuracy"] for n in agg.index)
        columns = [
            Column("model", "Model", show=lambda r: r["model"] + (f" {STALE}" if r["trained_by_other_code"] else "")),
            Column("note", "Change"),
        ]
        for key, (label, _, digits) in QUANTITIES.items():
            if key in OPTIONAL and not timed:
                continue
            columns.append(Column(f"{key}_mean", label, digits, f"{key}_std"))
            if key in STUDY:
                columns.append(Column(f"{key}_study", f"{label} (study)", 4))
        columns.append(Column("n", "n"))
        rows = []
        for name, row in agg.iterrows():
            published = inputs.models[name].get("published") or {}
            values = {"model": name, "note": inputs.models[name].get("note", ""), "n": int(row["n"])}
            for c in columns[2:-1]:
                if c.key.endswith("_study"):
                    values[c.key] = published.get(c.key.removesuffix("_study"))
                else:
                    values[c.key], values[c.spread] = row[c.key], row[c.spread]
            rows.append({**values, "trained_by_other_code": bool(row["stale"])})
        return pd.DataFrame(rows), columns, LADDER_NOTE

    return build


# ---- Table 3: the annex -----------------------------------------------------------------------------


def _flatten(entry: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in entry.items():
        if not prefix and key in configuration.OWN_KEYS + ("table",):
            continue
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _layer_names(items) -> list[str]:
    return [next(iter(item)) for item in configuration.flat_layers(items)]


def _show(key: str, value) -> str:
    if key in ("layers", "augmentation"):
        names = _layer_names(value)
        return ", ".join(names) if key == "augmentation" and names else f"{len(names)} layers" if names else "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items())
    return "none" if value is None else str(value)


def describe_change(entry: dict, base: dict | None) -> str:
    """What the entry changes from its `base`, computed from the resolved config."""
    if base is None:
        return "(first model of its line)"
    skip = configuration.OWN_KEYS + ("table",)
    # A setting that appears or disappears as a whole (e.g. early stopping) is one change.
    whole = {
        k
        for k in {**base, **entry}
        if k not in skip and isinstance(base.get(k), dict) != isinstance(entry.get(k), dict)
    }
    old = {**_flatten({k: v for k, v in base.items() if k not in whole}), **{k: base.get(k) for k in whole}}
    new = {**_flatten({k: v for k, v in entry.items() if k not in whole}), **{k: entry.get(k) for k in whole}}
    changes = []
    for key in [k for k in {**old, **new} if old.get(k) != new.get(k)]:
        text = f"{key}: {_show(key, old.get(key))} → {_show(key, new.get(key))}"
        if key == "layers":
            before, after = (
                collections.Counter(_layer_names(old.get(key))),
                collections.Counter(_layer_names(new.get(key))),
            )
            delta = [f"+{n}×{k}" for k, n in (after - before).items()] + [
                f"-{n}×{k}" for k, n in (before - after).items()
            ]
            text += f" ({', '.join(delta) or 'same layers, new arguments'})"
        changes.append(text)
    return "; ".join(changes) or "(no change)"


ANNEX_NOTE = (
    "Layers counts Keras' model.layers (input, augmentation and output layers included; a "
    "backbone counts as one); Parameters is model.count_params() of the trained model. "
    "'What changed' compares each resolved entry with the entry it names as base."
)


def annex_table(inputs: Inputs):
    ladder = [n for n, e in inputs.models.items() if configuration.in_study_tables(e)]
    agg = aggregate(inputs.runs, ladder) if len(inputs.runs) else pd.DataFrame()
    sizes = inputs.runs.groupby("model")[["params", "layers"]].first() if len(inputs.runs) else None
    rows = []
    for name, row in agg.iterrows():
        entry = inputs.models[name]
        backbone = entry.get("backbone")
        rows.append(
            {
                "model": name,
                "note": entry.get("note", ""),
                "changes": describe_change(entry, inputs.models.get(entry.get("base"))),
                "backbone": f"{backbone['name']} ({backbone['weights']}, {backbone['trainable']})" if backbone else "",
                "layers": int(sizes.loc[name, "layers"]),
                "params": int(sizes.loc[name, "params"]),
                "optimizer": entry["optimizer"]["name"],
                "learning_rate": entry["optimizer"]["learning_rate"],
                "batch_size": entry["batch_size"],
                "augmentation": ", ".join(
                    ["alternating flip"] * bool(entry.get("alternating_flip")) + _layer_names(entry["augmentation"])
                )
                or "none",
                **{k: row[k] for k in ("epochs_run_mean", "epochs_run_std", "train_seconds_mean", "train_seconds_std")},
                "n": int(row["n"]),
            }
        )
    columns = [
        Column("model", "Model"),
        Column("note", "Study's change"),
        Column("changes", "What changed (from config)"),
        Column("backbone", "Backbone"),
        Column("layers", "Layers"),
        Column("params", "Parameters", show=lambda r: f"{r['params']:,}"),
        Column("optimizer", "Optimizer"),
        Column("learning_rate", "Learning rate", show=lambda r: f"{r['learning_rate']:g}"),
        Column("batch_size", "Batch size"),
        Column("augmentation", "Augmentation"),
        Column("epochs_run_mean", "Epochs", 1, "epochs_run_std"),
        Column("train_seconds_mean", "Train time (s)", 0, "train_seconds_std"),
        Column("n", "n"),
    ]
    return pd.DataFrame(rows), columns, ANNEX_NOTE


# ---- Table 4: did each step help? --------------------------------------------------------------------


def steps_table(inputs: Inputs):
    frame = stats.steps_frame(inputs.models, inputs.runs, inputs.probs)
    columns = [
        Column("step", "Step", show=lambda r: f"{r['model']} vs {r['compared_to']}"),
        Column("note", "Change"),
        Column("study_claim", "Study's claim", show=lambda r: r["study_claim"] or "(beyond the study)"),
        Column(
            "study_diff", "Study's Δ", show=lambda r: f"{r['study_diff']:+.4f}" if pd.notna(r["study_diff"]) else ""
        ),
        Column("verdict", "Our verdict"),
        Column("agrees", "Agrees", show=lambda r: {True: "yes", False: "no"}.get(r["agrees"], "")),
        Column("diff", "Δ test acc. (seed)", show=lambda r: f"{r['diff']:+.4f} (seed {r['seed']})"),
        Column("ci_low", "95 % CI", show=lambda r: f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]"),
        Column("only_new", "Only new right / only old right", show=lambda r: f"{r['only_new']} / {r['only_ref']}"),
        Column("p", "McNemar p", show=lambda r: f"{r['p']:.2g}"),
        Column("p_holm", "Holm p", show=lambda r: f"{r['p_holm']:.2g}"),
        Column(
            "mean_diff",
            "Δ mean over seeds",
            show=lambda r: (
                f"{r['mean_diff']:+.4f} (n {r['n_new']} vs {r['n_ref']})" if r["n_new"] > 1 or r["n_ref"] > 1 else ""
            ),
        ),
        Column(
            "diff_per_seed",
            "Δ per pair of runs",
            show=lambda r: r["diff_per_seed"] if r["n_new"] > 1 or r["n_ref"] > 1 else "",
        ),
    ]
    return frame, columns, stats.footnote(frame, inputs.runs)


# ---- sweeps ---------------------------------------------------------------------------------------

SWEEP_NOTE = (
    "Every point of every sweep (sweeps: in config.yaml): the settings it varies, then mean ± standard "
    "deviation over its n seeds. Choose settings by the validation columns; the test columns are reported, "
    "not for choosing. Each point is an entry of its own: its name says its settings."
)
SWEEP_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "epochs_run")


def sweep_table(inputs: Inputs):
    points = {n: e for n, e in inputs.models.items() if configuration.in_sweep_table(e)}
    agg = aggregate(inputs.runs, list(points)) if len(inputs.runs) and points else pd.DataFrame()
    params = list(dict.fromkeys(p for e in points.values() for p in e["sweep_params"]))
    rows = []
    for name, row in agg.iterrows():
        entry = points[name]
        rows.append(
            {
                "sweep": entry["sweep"],
                "model": name,
                **{p: entry["sweep_params"].get(p) for p in params},
                **{f"{k}_{stat}": row[f"{k}_{stat}"] for k in SWEEP_METRICS for stat in ("mean", "std")},
                "n": int(row["n"]),
            }
        )
    columns = [Column("sweep", "Sweep"), *(Column(p, p) for p in params)]
    columns += [Column(f"{k}_mean", QUANTITIES[k][0], QUANTITIES[k][2], f"{k}_std") for k in SWEEP_METRICS]
    columns += [Column("n", "n"), Column("model", "Entry")]
    return pd.DataFrame(rows), columns, SWEEP_NOTE


# ---- compare: chosen runs side by side, only what differs -----------------------------------------

COMPARE_METRICS = ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "f1_macro", "epochs_run", "train_seconds")


def settings(entry: dict) -> dict:
    """An entry's settings as one flat dictionary, lists (layers, augmentation) summarised."""
    flat = _flatten({**configuration.training_part(entry), "tta": entry["tta"]})
    return {k: _show(k, v) if k in ("layers", "augmentation") else v for k, v in flat.items() if k != "name"}


def compare_frame(
    models: dict,
    runs: pd.DataFrame,
    names: list[str] | None = None,
    sort: str = "val_accuracy",
    ascending: bool = False,
) -> tuple[pd.DataFrame, list[str]]:
    """One row per chosen entry (mean ± std over its seeds), the settings that differ among them
    as columns, sorted by ``sort`` (any metric, or a setting). Returns (frame, setting columns)."""
    names = [n for n in (list(models) if names is None else names) if n in set(runs["model"])]
    if not names:
        return pd.DataFrame(), []
    flat = {n: settings(models[n]) for n in names}
    keys = list(dict.fromkeys(k for f in flat.values() for k in f))
    differ = [k for k in keys if len({json_key(flat[n].get(k)) for n in names}) > 1]
    agg = aggregate(runs, names)
    rows = [
        {
            "model": n,
            **{k: flat[n].get(k) for k in differ},
            **{f"{q}_{s}": agg.loc[n, f"{q}_{s}"] for q in COMPARE_METRICS for s in ("mean", "std")},
            "n": int(agg.loc[n, "n"]),
        }
        for n in names
    ]
    frame = pd.DataFrame(rows)
    key = sort if sort in frame else f"{sort}_mean"
    if key not in frame:
        raise KeyError(
            f"cannot sort by {sort!r}: choose a metric ({', '.join(COMPARE_METRICS)}) or a setting that differs"
        )
    return frame.sort_values(key, ascending=ascending, kind="stable").reset_index(drop=True), differ


def json_key(value) -> str:
    import json

    return json.dumps(value, sort_keys=True, default=str)


def compare_columns(differ: list[str]) -> list[Column]:
    columns = [Column("model", "Entry"), *(Column(k, k) for k in differ)]
    columns += [Column(f"{q}_mean", QUANTITIES[q][0], QUANTITIES[q][2], f"{q}_std") for q in COMPARE_METRICS]
    return columns + [Column("n", "n")]


COMPARE_NOTE = (
    "Every entry of the run side by side, best validation accuracy first; only the settings that differ "
    "between entries are shown (lists of layers summarised). Mean ± std over n seeds. For a chosen set and "
    "another order: python tools/compare.py --results <results_dir> --models 'model_10*' --sort test_loss."
)


def compare_table(inputs: Inputs):
    holdout = [n for n, e in inputs.models.items() if protocols.of(e) == protocols.DEFAULT]  # compared by validation
    frame, differ = compare_frame(inputs.models, inputs.runs, holdout) if len(inputs.runs) else (pd.DataFrame(), [])
    return frame, compare_columns(differ), COMPARE_NOTE


# ---- protocols: method or irreproducibility? ------------------------------------------------------

PROTOCOLS_NOTE = (
    "Per rung, the study's number and ours under each training protocol that ran (cnnstudy/protocols.py). "
    "Study: the study's published validation accuracy, measured on the CIFAR-10 test set. holdout: ours as in "
    "Table 1, trained on 90 % of the training images, epochs chosen (early stopping) on the other 10 %. refit: "
    "trained from scratch on all 50 000 training images for the epoch count its holdout run with the same seed "
    "kept, no early stopping; it has no validation split, so no validation column. study: the study's method, "
    "trained on all 50 000 and early-stopped on the test set: its test accuracy is test-selected (the test set "
    "chose its epochs), an optimistic number not comparable to the holdout and refit columns, shown only to "
    "compare with the study's. Test accuracy: the final model as evaluated, mean ± standard deviation over n "
    "seeds. Gap: our mean minus the study's number. − holdout, same seeds: over the seeds this protocol and "
    "holdout both ran (n), the mean of this protocol's test accuracy minus the holdout run's of the same seed; "
    "like with like where the protocols ran different seeds. Epochs: epochs trained, mean over seeds."
)


def has_protocols(models: dict) -> bool:
    """Whether a run has refit or study entries (only then is the protocols table written)."""
    return any(protocols.of(e) != protocols.DEFAULT for e in models.values())


def _same_seeds(runs: pd.DataFrame, entry: str, holdout: str) -> pd.Series:
    """Per seed both ran: ``entry``'s test accuracy minus its holdout run's (like with like: a refit
    trains for the epochs its holdout run of that seed kept)."""
    by_seed = {name: runs[runs["model"] == name].set_index("seed")["test_accuracy"] for name in (entry, holdout)}
    common = by_seed[entry].index.intersection(by_seed[holdout].index)
    return by_seed[entry][common] - by_seed[holdout][common]


def protocols_table(inputs: Inputs):
    ran = set(inputs.runs["model"]) if len(inputs.runs) else set()
    # A rung appears once one of its refit or study entries has a finished run (a published page
    # describes the entries still training, for its status line, before they have any).
    derived = [n for n, e in inputs.models.items() if protocols.of(e) != protocols.DEFAULT and n in ran]
    ladder = list(inputs.models)  # rungs in the ladder's order, not in the order their runs were added
    rungs = sorted(
        dict.fromkeys(protocols.holdout_name(n) for n in derived),
        key=lambda r: ladder.index(r) if r in ladder else len(ladder),
    )
    rows = []
    for rung in rungs:
        members = [n for n in [rung, *derived] if protocols.holdout_name(n) == rung and n in ran]
        agg = aggregate(inputs.runs, members)
        study = ((inputs.models.get(rung) or {}).get("published") or {}).get("val_accuracy")
        for name in sorted(members, key=lambda n: protocols.PROTOCOLS.index(protocols.of(inputs.models[n]))):
            protocol = protocols.of(inputs.models[name])
            row = agg.loc[name]
            paired = _same_seeds(inputs.runs, name, rung) if name != rung else pd.Series(dtype=float)
            rows.append(
                {
                    "model": rung,
                    "protocol": protocol,
                    "entry": name,
                    "n": int(row["n"]),
                    "test_accuracy_mean": row["test_accuracy_mean"],
                    "diff_to_holdout": paired.mean() if len(paired) else np.nan,
                    "paired_seeds": len(paired),
                    "test_accuracy_std": row["test_accuracy_std"],
                    "study_test_accuracy": study,
                    "gap_to_study": row["test_accuracy_mean"] - study if study is not None else np.nan,
                    "val_accuracy_mean": row["val_accuracy_mean"],
                    "val_accuracy_std": row["val_accuracy_std"],
                    "epochs_run_mean": row["epochs_run_mean"],
                    "epochs_run_std": row["epochs_run_std"],
                    "trains_on": protocols.TRAINS_ON[protocol],
                    "epochs_chosen_on": protocols.EPOCHS_CHOSEN_ON[protocol],
                    "test_selected": protocol == "study",
                }
            )
    columns = [
        Column("model", "Rung"),
        Column(
            "protocol", "Protocol", show=lambda r: r["protocol"] + (" (test-selected)" if r["test_selected"] else "")
        ),
        Column("trains_on", "Trains on"),
        Column("epochs_chosen_on", "Epochs chosen on"),
        Column("epochs_run_mean", "Epochs", 1, "epochs_run_std"),
        Column("study_test_accuracy", "Study", 4),
        Column("test_accuracy_mean", "Test accuracy", 4, "test_accuracy_std"),
        Column(
            "gap_to_study",
            "Gap to study",
            show=lambda r: f"{r['gap_to_study']:+.4f}" if pd.notna(r["gap_to_study"]) else "",
        ),
        Column(
            "diff_to_holdout",
            "− holdout, same seeds",
            show=lambda r: (
                f"{r['diff_to_holdout']:+.4f} (n {r['paired_seeds']})" if pd.notna(r["diff_to_holdout"]) else ""
            ),
        ),
        Column(
            "val_accuracy_mean",
            "Val. accuracy",
            show=lambda r: (
                cell(r["val_accuracy_mean"], r["val_accuracy_std"], 4)
                if r["protocol"] == protocols.DEFAULT
                else "none (trained on it)"
            ),
        ),
        Column("n", "n"),
    ]
    return pd.DataFrame(rows), columns, PROTOCOLS_NOTE


# ---- provenance and benchmarks -----------------------------------------------------------------------


def _commit(block: dict) -> str:
    return (block.get("git_commit") or "")[:12] + ("-dirty" if block.get("git_dirty") else "")


def provenance_table(inputs: Inputs):
    rows = []
    for _, run in inputs.runs.iterrows():
        p = run["provenance"]
        trained = p.get("training") or {}
        packages = trained.get("packages") or {}
        device = p.get("device") or {}
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
                "Trained at commit": _commit(trained.get("original") or trained),
                "Training code": (trained.get("original") or trained).get("code_hash"),
                "Reproduced at commit": _commit(trained) if trained.get("original") else "",
                "Code now": run["training_code"] + (f" {STALE}" if run["stale"] else ""),
                "Evaluation code now": run["evaluation_code"],
                "Verified at commit": ", ".join(
                    f"{v['commit'][:12]} ({v['date']}, {v['epochs']})" for v in p.get("verified") or []
                ),
            }
        )
    numeric = pd.DataFrame(rows)
    note = (
        "One row per model and seed, from its metrics file. Trained at commit, Training code: the checkout "
        "that trained the run and the hash of its train script and every workflow module that imports, "
        "as recorded then. Reproduced at commit: a commit whose code make verify-published found to "
        "reproduce the run (two epochs or more retrained, every history value equal), to which the run "
        "is attributed. Code now: same (the current training code hashes as the run's), verified (as "
        "a checked commit's: Verified at commit, with the date and the epochs compared) or differs "
        f"{STALE} (neither: verify or rerun it). Evaluation code now: the same for the code that "
        "evaluated the run."
    )
    return numeric, [Column(c, c) for c in numeric.columns], note


def benchmark_table(inputs: Inputs):
    from pathlib import Path

    rows = []
    for path in inputs.benchmarks:
        bench = pd.read_csv(path, sep="\t")
        root = inputs.benchmark_root
        job = Path(path).relative_to(root).with_suffix("").as_posix() if root else Path(path).stem
        rows.append(
            {
                "Job": job,
                "Wall time (s)": round(float(bench["s"].iloc[-1]), 1),
                "Peak RSS (MB)": round(float(bench["max_rss"].iloc[-1]), 0),
            }
        )
    numeric = pd.DataFrame(rows, columns=["Job", "Wall time (s)", "Peak RSS (MB)"])
    return (
        numeric,
        [Column(c, c) for c in numeric.columns],
        "From Snakemake's benchmark: files (max_rss is the peak resident memory).",
    )  # noqa: E501


REGISTRY = [
    Table("table1", "Table 1 - Custom CNNs (the study's ladder)", "table", ladder_table(1)),
    Table("table2", "Table 2 - Transfer learning", "table", ladder_table(2)),
    Table("table3", "Table 3 - The models: what changes from rung to rung", "table3", annex_table),
    Table("table4", "Table 4 - Did each step help? Paired tests on the test set", "table4", steps_table),
    Table("sweeps", "Sweeps: every point, mean ± std over seeds", "sweeps", sweep_table),
    Table("compare", "All runs compared: what differs, sorted by validation accuracy", "compare", compare_table),
    Table(
        "protocols",
        "Protocols: the study's number and ours, trained and selected three ways",
        "protocols",
        protocols_table,
        wanted=has_protocols,
    ),
    Table("provenance", "Provenance of every result", "provenance", provenance_table),
    Table("benchmarks", "Benchmarks: wall time and peak memory per job", "benchmarks", benchmark_table),
]
BY_NAME = {t.name: t for t in REGISTRY}


def wanted(models: dict) -> list[Table]:
    """The tables a run with these entries writes."""
    return [t for t in REGISTRY if t.wanted(models)]
