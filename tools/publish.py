"""Publish a study run: its small, citable outputs, in a folder meant for git.

    python tools/publish.py --results /path/to/study/results [more results] --out reports/study

From one or more results directories (finished, or still running: what is there is published,
and the page says how far it got) it writes, and never trains or evaluates anything:

    tables/     Tables 1, 3 and 4 and the provenance table (md, csv, tex, html)
    histories/  <model>_seed<s>.csv, every epoch of every run
    metrics/    <model>_seed<s>.json, test and validation metrics with provenance
    figures/    learning curves, confusion matrices, the ladder, the forest plot of Table 4
    README.md   the results page: the study's numbers beside ours, which claims held

    models.json the entries as the runs were described (for --refresh)

Trained models, test-set probabilities and data stay out (they are large or derived data).

    python tools/publish.py --refresh --out reports/study

rewrites, from the folder alone (the results directories may be gone), what depends on the runs'
provenance and the current code: Table 1 (its † marks), the provenance table, the protocols
table and the page; after ``verify_published.py record`` has added checks to the metrics files.

    python tools/publish.py --add --results /path/to/protocol/results --out reports/study

adds the runs of entries not yet published (refit and study runs, a new rung) to the folder:
their metrics, histories, learning curves and confusion matrices, their entries to models.json
(with the entries the run still trains, so that the page's status counts every planned run);
then refreshes it. Tables 3 and 4 are left as they are (Table 4 needs the test-set probabilities
of every run, which are not published).

The entries are described as they were trained: each from the specs/models.json of the results
directory its runs are in (a later rung run from a newer checkout, in a directory of its own, is
published beside the study's run without touching it); models.json is the merged description.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))  # the workflow's cnnstudy package

from cnnstudy import cli, configuration, figures, protocols, provenance, reporting, tables
from cnnstudy.errors import JobError
from cnnstudy.files import atomic_path, read_json, write_json

log = logging.getLogger("cnnstudy.publish")

# Table 2 (transfer learning) cannot be rerun without ImageNet weights; per-job benchmarks are
# that machine's timings, not results.
PUBLISHED_TABLES = ["table1", "table3", "table4", "provenance", "protocols"]  # protocols: where refit or study ran
# What --refresh rewrites: the tables that read the runs' provenance and the current code's hashes.
REFRESHED_TABLES = ["table1", "provenance", "protocols"]
MODELS_FILE = "models.json"


def _runs(results: Path) -> list[tuple[str, int, Path]]:
    found = []
    for metrics in sorted(results.glob("metrics/*/seed_*/metrics.json")):
        found.append((metrics.parent.parent.name, int(metrics.parent.name.removeprefix("seed_")), metrics.parent))
    return found


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.{digits}f}"


def stopping(metrics: list[dict], info: dict) -> list[str]:
    """Where early stopping ended each seed of the early-stopped holdout entries with several seeds
    (what the protocols section compares them with: validation-split stopping; a study run's stopping
    watched the test set)."""
    lines = []
    holdout = [m for m in metrics if (m.get("protocol") or {}).get("name", protocols.DEFAULT) == protocols.DEFAULT]
    for name in dict.fromkeys(m["model"] for m in holdout):
        seeds = sorted((m for m in metrics if m["model"] == name), key=lambda m: m["seed"])
        if len(seeds) < 2 or not info[name].get("early_stopping"):
            continue
        published = info[name].get("published") or {}
        runs = "; ".join(
            f"seed {m['seed']}: stopped after {m['epochs_run']}, kept epoch {m['kept_epoch']['epoch']}, train acc. "
            f"{m['kept_epoch']['accuracy']:.4f}, test acc. {m['test']['accuracy']:.4f}"
            for m in seeds
        )
        lines += [
            f"  {name}, the same configuration over seeds (study: train acc. {_fmt(published.get('accuracy'))}, "
            f"val. acc. {_fmt(published.get('val_accuracy'))}): {runs}. The validation loss is noisy from epoch to epoch,",
            "  so where patience ends a run depends on the seed, and test accuracy with it.",
        ]
    return lines


def claims_summary(table4) -> list[str]:
    """How many of the study's step claims held, and which verdicts (held or not) are within training noise."""
    claimed = table4[table4["study_claim"] != ""]
    held = claimed["agrees"].astype(bool)
    seeded = claimed[(claimed["n_new"] > 1) | (claimed["n_ref"] > 1)]
    return [*_noise_lines(claimed, held, seeded), *_study_number_lines(claimed, held)]


def _noise_lines(claimed: pd.DataFrame, held: pd.Series, seeded: pd.DataFrame) -> list[str]:
    """How many claims held, and which verdicts another pair of training runs would flip."""

    def flips(rows) -> str:
        return ", ".join(f"{r['model']} vs {r['compared_to']}" for _, r in rows.iterrows() if not r["sign_holds"])

    held_flips, other_flips = flips(seeded[held[seeded.index]]), flips(seeded[~held[seeded.index]])
    lines = [
        f"{int(held.sum())} of {len(claimed)} of the study's step claims held at this data and seed (rule: improved or",
        "worse when McNemar's Holm-corrected p < 0.05). The interval and p-value compare one training run of each",
        "entry on the same test images: they cover the sampling of test images, not training noise.",
        f"{len(seeded)} of the claimed steps can be checked against other training runs (an entry with several seeds)"
        + ("; each keeps its sign in every pair of runs." if not (held_flips or other_flips) else "."),
    ]
    if held_flips:
        lines.append(
            f"The sign of the step changes from one pair of runs to another for {held_flips}: the claim held"
            " for the pair compared, but that is within training noise."
        )
    if other_flips:
        lines.append(
            f"The sign of the step also changes between pairs of runs for {other_flips}, where our verdict went"
            " against the study's claim: that verdict is the compared pair's and within training noise, so it"
            " does not refute the claim."
        )
    return lines


def _study_number_lines(claimed: pd.DataFrame, held: pd.Series) -> list[str]:
    """The study's own published numbers against our verdict: which way each moved (+1, -1; 0 when
    a verdict or claim is "no significant change", which one pair of numbers cannot judge)."""
    lines = []
    direction = {"improved": 1, "worse": -1}
    known = claimed[claimed["study_diff"].notna()]
    study = np.sign(known["study_diff"])
    ours, claim = known["verdict"].map(direction).fillna(0), known["study_claim"].map(direction).fillna(0)
    held_known = held[known.index]

    def listed(rows) -> str:
        return ", ".join(
            f"{r['model']} vs {r['compared_to']} (study {r['study_diff']:+.4f}, ours {r['diff']:+.4f})"
            for _, r in rows.iterrows()
        )

    if (our_way := known[~held_known & (study == ours) & (ours != 0)]).size:
        lines.append(
            f"Where our verdict went against the study's words, its own published numbers moved our way for "
            f"{listed(our_way)}: the text claims what its table does not show."
        )
    if (other_way := known[~held_known & (study == -ours) & (ours != 0)]).size:
        lines.append(f"Its numbers moved the other way for {listed(other_way)}: that step did not reproduce.")
    if (unsupported := known[held_known & (study != claim) & (claim != 0)]).size:
        lines.append(
            f"The claim held for us, though the study's own numbers moved the other way, for {listed(unsupported)}."
        )
    return lines


def reproduced_by(metrics: list[dict], total: int) -> list[str]:
    """Where to reproduce the runs from (verify_published's checks) and what the † means. A run
    checked with code that hashes as this checkout's training code is reproduced from this checkout
    (any commit with that training code retrains it alike); any other from the commit of its latest check."""
    current = provenance.code_hash("train.py")
    checks: dict[str, dict[str, int]] = {}
    for m in metrics:
        verified = m["provenance"].get("verified") or []
        if not verified:
            continue
        here = tables.checks_with(m["provenance"], "training", current)
        source = "here" if here else verified[-1]["commit"]
        chosen = here or [v for v in verified if v["commit"] == source]
        for epochs in sorted({v["epochs"] for v in chosen}):
            checks.setdefault(source, {}).setdefault(epochs, 0)
            checks[source][epochs] += 1
    lines = [
        "A run trains from a checkout pinned where it started, so the code moves on beside it. `make",
        "verify-published` checks the published runs against a checkout's code: it retrains each run's first",
        "epochs (two by default) with the thread count and precision the run recorded, and requires every",
        "history value but timing to equal the published one, bit for bit; a run whose first two epochs",
        "match has trained the same arithmetic (data order, augmentation and dropout draws, optimizer, schedule).",
    ]
    if checks:
        lines.append(
            "**Reproduce these runs from:** "
            + "; ".join(
                (
                    f"this checkout, or any whose training code hashes {current}"
                    if source == "here"
                    else f"commit {source[:12]}"
                )
                + " ("
                + ", ".join(f"{n} of {total} runs: epochs {epochs}" for epochs, n in sorted(done.items()))
                + ")"
                for source, done in sorted(checks.items(), key=lambda item: item[0] != "here")
            )
            + ": `git checkout` the commit named (a run of this checkout's training code needs none) and run the"
            " recipe in the repository's README."
        )
    lines += [
        "The tables mark † a run whose training code (the train script and every module it imports) differs",
        "from this checkout's and that no such check has vouched for; tables/provenance.md has each run's",
        "commits, code hashes and checks. CI runs the check on model_09 and model_17 (`tests/test_verify_published.py`).",
    ]
    return lines


def _closed(gap: float, other: float) -> str:
    """How much of the holdout gap another protocol closes, in words."""
    if gap == 0 or pd.isna(other):
        return ""
    if gap > 0:
        return f"moves {other - gap:+.4f} from holdout"
    share = (other - gap) / -gap
    return f"closes {share:.0%} of the gap" if share >= 0 else f"widens the gap by {-share:.0%}"


def protocol_answers(frame: pd.DataFrame, table1: pd.DataFrame) -> list[str]:
    """Per rung of the protocols table: how much of the gap to the study each protocol closes."""
    if frame is None or not len(frame):
        return []
    lines = [
        "",
        "## Method or irreproducibility? Three protocols",
        "",
        "Two differences of method sit between the study's numbers and ours: it trained on all 50 000 training",
        "images (we on 45 000, holding 5 000 out), and it chose its settings, by its wording also its stopping",
        "point, on the test set. The rungs below were also trained under **refit** (all 50 000 images for the",
        "epoch count the holdout run kept) and under the **study**'s protocol (all 50 000, early-stopped on the",
        "test set: test-selected, optimistic by construction). [tables/protocols.md](tables/protocols.md) has",
        "every number; the holdout tables above are unchanged. A refit run keeps its last epoch's weights",
        "where an early-stopped run restores its best epoch's; with the same seed, a refit and a study run are",
        "one run up to where the shorter stops (docs/configuration.md).",
        "",
    ]
    spread = _seed_spread(table1)
    answers = [_rung_answer(rung, rows, spread) for rung, rows in frame.groupby("model", sort=False)]
    return lines + answers + _across_rungs(frame, spread)


def _across_rungs(frame: pd.DataFrame, spread: str) -> list[str]:
    """Per protocol run on two or more of the study's rungs: its difference to holdout on the same
    seeds, rung by rung, with the mean and how many rungs it raised, read against the seed spread."""
    lines = []
    ladder = frame[frame["study_test_accuracy"].notna() & frame["diff_to_holdout"].notna()]
    for protocol, rows in ladder.groupby("protocol", sort=False):
        if len(rows) < 2:
            continue
        diffs = rows.set_index("model")["diff_to_holdout"]
        lines.append(
            f"- **Across the study's rungs**, {protocol} − holdout on the same seeds: "
            + ", ".join(f"{rung} {diff:+.4f}" for rung, diff in diffs.items())
            + f" (mean {diffs.mean():+.4f}; above holdout on {int((diffs > 0).sum())} of {len(diffs)}), "
            f"against {spread}."
        )
    return lines


def _seed_spread(table1: pd.DataFrame) -> str:
    """The widest seed spread of any rung: the scale a one-seed gap is read against."""
    scale = table1[table1["n"] > 1].sort_values("test_accuracy_std", ascending=False).head(1)
    if not len(scale):
        return "the seed spread of an entry run with several seeds"
    return (
        f"{scale['model'].iloc[0]}'s seed spread ({scale['test_accuracy_std'].iloc[0]:.3f}, the standard deviation of its "
        "holdout test accuracy)"
    )


def _paired(row: pd.Series, hold: pd.Series) -> str:
    """Where a protocol and holdout ran different seeds, the like-with-like difference beside the means'."""
    if row["paired_seeds"] == row["n"] == hold["n"] or pd.isna(row["diff_to_holdout"]):
        return ""
    return f"; − holdout on the same seeds {row['diff_to_holdout']:+.4f}, n {int(row['paired_seeds'])}"


def _rung_answer(rung: str, rows: pd.DataFrame, spread: str) -> str:
    """One rung's line: each protocol's test accuracy, and what each closes of the gap to the study."""
    by = {r["protocol"]: r for _, r in rows.iterrows()}
    hold = by.get("holdout")
    text = "; ".join(
        f"{p} {tables.cell(r['test_accuracy_mean'], r['test_accuracy_std'], 4)} (n {int(r['n'])}, {r['epochs_run_mean']:.0f} epochs)"
        for p, r in by.items()
    )
    study = rows["study_test_accuracy"].iloc[0]
    if hold is None:
        return f"- **{rung}**: {text}; its holdout runs are not published here."
    if pd.isna(study):  # a rung beyond the study: refit against holdout
        deltas = ", ".join(
            f"{p} − holdout {r['test_accuracy_mean'] - hold['test_accuracy_mean']:+.4f}{_paired(r, hold)}"
            for p, r in by.items()
            if p != "holdout"
        )
        return f"- **{rung}** (beyond the study): {text}. {deltas}."
    gap = hold["gap_to_study"]
    parts = [f"- **{rung}** (study {study:.4f}): {text}. Holdout is {gap:+.4f} from the study"]
    for protocol, label in (("study", "the study's protocol"), ("refit", "refit")):
        if protocol in by:
            r = by[protocol]
            parts.append(f"{label} {_closed(gap, r['gap_to_study'])} (to {r['gap_to_study']:+.4f}{_paired(r, hold)})")
    remaining = min((by[p]["gap_to_study"] for p in by), key=abs)  # the smallest gap any protocol leaves
    parts.append(f"what remains: {remaining:+.4f}")
    single = all(int(r["n"]) == 1 for r in by.values())
    return "; ".join(parts) + "." + (f" One seed per protocol: read these against {spread}." if single else "")


def page(
    out: Path,
    info: dict,
    table1: pd.DataFrame,
    table4: pd.DataFrame,
    runs: list,
    expected: int,
    protocols_frame: pd.DataFrame | None = None,
) -> str:
    """The results page, written for a reader of the study: each section from the published
    files (the runs' metrics and their provenance, the tables)."""
    metrics = [read_json(out / "metrics" / f"{m}_seed{s}.json") for m, s, _ in runs]
    lines = [
        *_header(metrics, len(runs), expected),
        *_table1_section(info, table1, metrics),
        *_steps_section(table4),
        *_noise_section(table1),
        *protocol_answers(protocols_frame, table1),
        *_method_section(metrics, info),
        *_not_rerun_section(metrics),
        *_files_section(),
    ]
    return "\n".join(lines)


def machines(metrics: list[dict]) -> str:
    """Where the runs trained, from their provenance: 'a 2-core CPU (AMD EPYC)', or several."""
    found = []
    for m in metrics:
        device = m["provenance"].get("device") or {}
        kind, name, count = device.get("kind", "?"), device.get("name", ""), device.get("count")
        text = (
            f"a {count}-core {kind}"
            if kind == "CPU" and count
            else f"a {kind}"
            if kind != "?"
            else "an unrecorded device"
        )
        text += f" ({name})" if name else ""
        if text not in found:
            found.append(text)
    return " and ".join(found) or "an unrecorded device"


def precisions(metrics: list[dict]) -> str:
    """The Keras dtype policies the runs trained in, from their provenance."""
    return ", ".join(sorted({m["provenance"].get("precision", "?") for m in metrics})) or "?"


def _header(metrics: list[dict], finished: int, expected: int) -> list[str]:
    trained = [m["provenance"].get("training", {}) for m in metrics]
    originals = [t.get("original") or t for t in trained]  # as trained, before any re-attribution
    commits = sorted(
        {(t.get("git_commit") or "unknown")[:12] + ("-dirty" if t.get("git_dirty") else "") for t in originals}
    )
    threads = sorted({(m["provenance"].get("threads") or {}).get("intra_op") for m in metrics} - {None})
    seconds = sum(m["train_seconds"] for m in metrics)
    return [
        "# The study, rerun on the full CIFAR-10",
        "",
        "The custom-CNN ladder of the study (`../shared/reference/cifar10-cnn-study.md`, Table 1) and this",
        "workflow's rungs beyond it (`model_17` on), trained on the full data (45 000 training images, 5 000",
        "held out for validation, the 10 000 test images untouched), as configured in `config.yaml`. Generated",
        "by `python tools/publish.py` from the runs' results directories; do not edit by hand.",
        "",
        f"**Status:** {finished} of {expected} runs finished"
        + (" (the run is still going; this page shows what has finished)." if finished < expected else "."),
        f"Trained at commit(s) {', '.join(commits)} (each run's: tables/provenance.md) on {machines(metrics)}, "
        f"{', '.join(map(str, threads))} intra-op thread(s), {precisions(metrics)}; "
        f"{seconds / 3600:.1f} h of training in all.",
        *reproduced_by(metrics, finished),
        "",
    ]


def _table1_section(info: dict, table1: pd.DataFrame, metrics: list[dict]) -> list[str]:
    lines = [
        "## Table 1: the study's numbers and ours",
        "",
        "| rung | change | study: train acc. | ours: train acc. | study: val. acc. (its test set) | ours: val. acc. | ours: test acc. "
        "| ours − study, test images | ours: epochs | ours: img/s | n |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    speed = {}
    for m in metrics:
        speed.setdefault(m["model"], []).append(m["train_images_per_s"])
    for _, row in table1.iterrows():
        name = row["model"]
        published = info[name].get("published") or {}
        gap = None if published.get("val_accuracy") is None else row["test_accuracy_mean"] - published["val_accuracy"]
        mark = f" {tables.STALE}" if row["trained_by_other_code"] else ""
        lines.append(
            f"| {name}{mark} | {info[name].get('note', '')} | {_fmt(published.get('accuracy'))} | "
            f"{tables.cell(row['accuracy_mean'], row['accuracy_std'], 4)} | {_fmt(published.get('val_accuracy'))} | "
            f"{tables.cell(row['val_accuracy_mean'], row['val_accuracy_std'], 4)} | "
            f"{tables.cell(row['test_accuracy_mean'], row['test_accuracy_std'], 4)} | "
            f"{'' if gap is None else f'{gap:+.4f}'} | "
            f"{_fmt(row['epochs_run_mean'], 0)} | {sum(speed[name]) / len(speed[name]):.0f} | {int(row['n'])} |"
        )
    lines += [
        "",
        "Train accuracy: Keras' running mean over the kept epoch in training mode (augmentation and dropout",
        "on), as the study measured it. Validation and test: the final model as evaluated. ours − study: our",
        "mean test accuracy minus the study's validation accuracy, both measured on the 10 000 CIFAR-10 test",
        "images (the study trained on 50 000 images and chose its settings on these; we on 45 000). img/s: the median",
        "epoch's training images per second of wall clock (epoch 1 left out), one job's, with other jobs",
        "sharing the machine: a record of this run, not a speed comparison (that is `docs/speed.md`). Full",
        "columns, losses and footnotes: [tables/table1.md](tables/table1.md); what each rung changes:",
        "[tables/table3.md](tables/table3.md). † after a rung: as in the tables, a run of it was trained by",
        "training code other than this checkout's and no check has vouched for it (above).",
    ]
    return lines


def _steps_section(table4: pd.DataFrame) -> list[str]:
    lines = ["", "## Did each step help? (Table 4)", ""]
    if len(table4):
        lines += [
            "| step | the study says | the study's Δ | our verdict | Δ test accuracy [95 % CI] (seed) | Holm p "
            "| Δ of the means over seeds | Δ per pair of runs |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for _, r in table4.iterrows():
            several = r["n_new"] > 1 or r["n_ref"] > 1
            lines.append(
                f"| {r['model']} vs {r['compared_to']} | {r['study_claim'] or '(beyond the study)'} | "
                + (f"{r['study_diff']:+.4f}" if pd.notna(r["study_diff"]) else "")
                + f" | **{r['verdict']}** | "
                f"{r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}] (seed {r['seed']}) | {r['p_holm']:.2g} | "
                + (
                    f"{r['mean_diff']:+.4f} ({r['n_new']:.0f} vs {r['n_ref']:.0f} seeds) | {r['diff_per_seed']} |"
                    if several
                    else "(one seed each) | |"
                )
            )
        lines += [
            "",
            *claims_summary(table4),
            "Details and the study's words: [tables/table4.md](tables/table4.md); forest plot:",
            "[figures/steps_forest.png](figures/steps_forest.png).",
        ]
    else:
        lines.append("No step has both of its runs finished yet.")
    return lines


def _noise_section(table1: pd.DataFrame) -> list[str]:
    spreads = [
        f"{r['model']} {r['test_accuracy_mean']:.4f} ± {r['test_accuracy_std']:.4f} over {int(r['n'])} seeds"
        for _, r in table1[table1["n"] > 1].iterrows()
    ]
    return [
        "",
        "**Training noise**, as the spread of test accuracy over the seeds of one configuration (mean ± standard",
        f"deviation): {'; '.join(spreads) or 'no entry has several seeds yet'}. A step whose single-seed Δ is",
        "within that spread may change sign with another seed: read its verdict as that seed's, and the Δ of the",
        "means where an entry has several.",
    ]


def _method_section(metrics: list[dict], info: dict) -> list[str]:
    return [
        "",
        "## What differs in method",
        "",
        "- **Validation.** The study validated on the CIFAR-10 test set and chose its settings by it. Here a",
        "  stratified 10 % of the training images is the validation split (early stopping watches it) and the",
        "  test set is used once, for the final numbers. The study's 'validation accuracy' and our test accuracy",
        "  therefore measure the same 10 000 images; our models trained on 45 000 images, the study's on 50 000.",
        "- **Early stopping.** The study gives no patience; we use 5 epochs on validation loss with the best",
        "  weights restored (`config.yaml`, model_06).",
        *stopping(metrics, info),
        "- **Unstated settings** (learning rates, layer placement, augmentation ranges) are read as written next",
        "  to each entry in `config.yaml`.",
        f"- **Precision.** {precisions(metrics)} on {machines(metrics)}; the study trained in float32 on GPUs.",
    ]


def _not_rerun_section(metrics: list[dict]) -> list[str]:
    return [
        "",
        "## What could not be rerun here",
        "",
        "- **Transfer learning (Table 2, model_12 to model_16):** needs Keras' ImageNet weights, which cannot be",
        "  downloaded on the machine this ran on. Running them from random weights would say nothing about",
        "  transfer learning, so Table 2 is not published; `snakemake weights` then `snakemake` reruns them where",
        "  the weights can be fetched.",
        f"- **GPU timings:** every run here trained on {machines(metrics)}; times are that machine's, on those days. The",
        "  rungs' arithmetic alone (Keras on JAX, random images, no TensorFlow) was timed on an H200 GPU:",
        "  [docs/speed.md](../../docs/speed.md#on-a-gpu-through-keras-alone-toolskeras_speedpy).",
    ]


def _files_section() -> list[str]:
    return [
        "",
        "## Files",
        "",
        "`tables/` (md, csv, tex, html), `histories/` (every epoch), `metrics/` (test and validation metrics with",
        "provenance: commit, code hash, packages, device, threads), `figures/` (learning curves, confusion",
        "matrices, `ladder_accuracy.png`, `ladder_overlay.png`, `f1_heatmap.png`, `steps_forest.png`).",
        "",
    ]


def merged_entries(results_dirs: list[Path]) -> tuple[dict, list[tuple[str, int, Path, Path]]]:
    """The entries (each as described where its runs are, else where first described) and the
    runs (model, seed, metrics folder, results directory) of several results directories."""
    entries: dict = {}
    runs: list[tuple[str, int, Path, Path]] = []
    owner: dict[str, Path] = {}
    for results_dir in results_dirs:
        models_file = results_dir / "specs" / "models.json"
        if not models_file.is_file():
            raise FileNotFoundError(f"{models_file} not found: is {results_dir} a results directory of this workflow?")
        described = read_json(models_file)
        for model, seed, folder in _runs(results_dir):
            if owner.setdefault(model, results_dir) != results_dir:
                raise JobError(
                    f"{model} has runs in both {owner[model]} and {results_dir}: publish each entry from one run"
                )
            if model not in described:
                raise JobError(f"{results_dir} has runs of {model}, which its specs/models.json does not describe")
            runs.append((model, seed, folder, results_dir))
        for name, spec in described.items():
            if owner.get(name) == results_dir or name not in entries:
                entries[name] = spec
    return entries, runs


def published_entries(out_dir: Path, names: set[str]) -> dict:
    """The entries of a published folder: its models.json, or (a folder published before it kept
    one) this checkout's config.yaml, whose training settings verify_published checks run by run."""
    if (out_dir / MODELS_FILE).is_file():
        return read_json(out_dir / MODELS_FILE)
    import yaml

    log.warning("%s has no %s: describing its runs with this checkout's config.yaml", out_dir, MODELS_FILE)
    with open(Path(__file__).resolve().parents[1] / "config.yaml") as fh:
        entries = configuration.load(yaml.safe_load(fh))
    return {name: entry for name, entry in entries.items() if name in names}


def refresh(out: str, expected: int | None = None) -> dict:
    """Rewrite Table 1, the provenance table and the page from the published folder alone."""
    out_dir = Path(out)
    files = sorted((out_dir / "metrics").glob("*_seed*.json"))
    if not files:
        raise JobError(f"no published runs in {out_dir / 'metrics'}: nothing to refresh")
    loaded = [read_json(f) for f in files]
    entries = published_entries(out_dir, {m["model"] for m in loaded})
    write_json(out_dir / MODELS_FILE, entries)
    written = reporting.write_tables(
        str(out_dir / MODELS_FILE), [str(f) for f in files], str(out_dir / "tables"), only=REFRESHED_TABLES
    )
    table4 = pd.read_csv(out_dir / "tables" / "table4.csv", keep_default_na=False, na_values={"study_diff": [""]})
    for column in ("diff", "ci_low", "ci_high", "p_holm", "mean_diff", "n_new", "n_ref"):
        table4[column] = pd.to_numeric(table4[column])
    table4["sign_holds"] = table4["sign_holds"].map({"True": True, "False": False, True: True, False: False})
    table4["agrees"] = table4["agrees"].map({"True": True, "False": False, "": False, True: True, False: False})
    info = configuration.complete(entries)
    runs = [(m["model"], m["seed"], None) for m in loaded]
    expected = expected or sum(len(spec["seeds"]) for spec in info.values())
    with atomic_path(out_dir / "README.md") as tmp:
        tmp.write_text(page(out_dir, info, written["table1"], table4, runs, expected, written.get("protocols")))
    log.info("refreshed %s from its %d run(s)", out_dir, len(loaded))
    return written


def _unchanged(out_dir: Path, model: str, seed: int, folder: Path, results_dir: Path) -> bool:
    """Whether the run in ``results_dir`` is the one published in ``out_dir``: the same history, to the
    byte (wall-clock timing included: a retrained run differs there), and the same evaluated numbers."""
    published = out_dir / "histories" / f"{model}_seed{seed}.csv"
    metrics = out_dir / "metrics" / f"{model}_seed{seed}.json"
    if not (published.is_file() and metrics.is_file()):
        return False
    history = results_dir / "models" / model / f"seed_{seed}" / "history.csv"
    old, new = read_json(metrics), read_json(folder / "metrics.json")
    same = all(old.get(key) == new.get(key) for key in ("test", "val", "epochs_run", "kept_epoch"))
    return same and published.read_bytes() == history.read_bytes()


def add(results_dirs: list[Path], out: str) -> dict:
    """Add the runs of entries new to a published folder (refit and study runs, a new rung), then refresh it."""
    out_dir = Path(out)
    if not (out_dir / MODELS_FILE).is_file():
        raise JobError(f"{out_dir / MODELS_FILE} not found: --add adds to a published folder (publish the study first)")
    published = read_json(out_dir / MODELS_FILE)
    entries, runs = merged_entries(results_dirs)
    if not runs:
        raise JobError(f"no finished runs under {', '.join(f'{r}/metrics' for r in results_dirs)}: nothing to add")
    added = list(dict.fromkeys(model for model, *_ in runs))
    described = configuration.complete(entries)
    info = {name: described[name] for name in added}
    # Entries the run still trains (described, no run finished yet) are described too, so that the
    # page's status counts every planned run; an entry of the study's tables is only ever published whole.
    planned = [
        name
        for name, entry in described.items()
        if name not in added and name not in published and not configuration.in_study_tables(entry)
    ]
    ours = {f.name.rsplit("_seed", 1)[0] for f in (out_dir / "metrics").glob("*_seed*.json")}
    clash = [name for name in added if name in ours and configuration.in_study_tables(info[name])]
    if clash:
        raise JobError(
            f"{', '.join(clash)} already published in {out_dir}: --add does not replace the study's runs "
            "(publish it again with --results for that)"
        )
    # An entry added again (more seeds finished) is replaced as a whole, but a run published before
    # and unchanged keeps its published metrics: the checks verify_published recorded in them.
    kept = {(m, s) for m, s, folder, results_dir in runs if _unchanged(out_dir, m, s, folder, results_dir)}
    for name in added:
        for old in [
            *(out_dir / "metrics").glob(f"{name}_seed*.json"),
            *(out_dir / "histories").glob(f"{name}_seed*.csv"),
        ]:
            if (name, int(old.stem.rsplit("_seed", 1)[1])) not in kept:
                old.unlink()
    for sub in ("curves", "confusion"):
        (out_dir / "figures" / sub).mkdir(parents=True, exist_ok=True)
    for model, seed, folder, results_dir in runs:
        if (model, seed) in kept:
            continue
        history = results_dir / "models" / model / f"seed_{seed}" / "history.csv"
        shutil.copyfile(history, out_dir / "histories" / f"{model}_seed{seed}.csv")
        metrics = read_json(folder / "metrics.json")
        write_json(out_dir / "metrics" / f"{model}_seed{seed}.json", metrics)
        figures.run_figures(metrics, pd.read_csv(history), info[model], out_dir / "figures")
    write_json(out_dir / MODELS_FILE, {**published, **{name: entries[name] for name in [*added, *planned]}})
    log.info("added %d run(s) of %s to %s", len(runs), ", ".join(added), out_dir)
    return refresh(out)


def copy_runs(runs: list[tuple], out_dir: Path) -> None:
    """Each run's history and metrics into ``out_dir`` (histories/, metrics/), the folders made afresh."""
    for sub in ("tables", "histories", "metrics", "figures"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
        (out_dir / sub).mkdir(parents=True)
    for model, seed, folder, results_dir in runs:
        shutil.copyfile(
            results_dir / "models" / model / f"seed_{seed}" / "history.csv",
            out_dir / "histories" / f"{model}_seed{seed}.csv",
        )
        write_json(out_dir / "metrics" / f"{model}_seed{seed}.json", read_json(folder / "metrics.json"))


def main(
    results: list[str] | str | None,
    out: str,
    expected: int | None = None,
    refresh_only: bool = False,
    add_only: bool = False,
) -> dict:
    if refresh_only:
        return refresh(out, expected)
    if not results:
        raise JobError("--results: give the study run's results directory (or --refresh)")
    results_dirs, out_dir = [Path(r) for r in ([results] if isinstance(results, str) else results)], Path(out)
    if add_only:
        return add(results_dirs, out)
    entries, runs = merged_entries(results_dirs)
    if not runs:
        raise JobError(f"no finished runs under {', '.join(f'{r}/metrics' for r in results_dirs)}: nothing to publish")
    info = configuration.complete(entries)
    copy_runs(runs, out_dir)
    metrics = [str(folder / "metrics.json") for _, _, folder, _ in runs]
    histories = [str(r / "models" / m / f"seed_{s}" / "history.csv") for m, s, _, r in runs]
    models_file = out_dir / MODELS_FILE
    write_json(models_file, entries)
    written = reporting.write_tables(
        str(models_file),
        metrics,
        str(out_dir / "tables"),
        probs=[str(f / "test_probs.npz") for _, _, f, _ in runs],
        only=PUBLISHED_TABLES,
    )
    figures.write_all(
        str(models_file), metrics, histories, str(out_dir / "figures"), steps=str(out_dir / "tables" / "table4.csv")
    )
    if not any(configuration.in_sweep_table(spec) for spec in info.values()):
        (out_dir / "figures" / "sweeps.png").unlink()  # the workflow's placeholder: a study run has no sweeps
    expected = expected or sum(len(spec["seeds"]) for spec in info.values())
    runs = [(m, s, f) for m, s, f, _ in runs]
    with atomic_path(out_dir / "README.md") as tmp:
        tmp.write_text(
            page(out_dir, info, written["table1"], written["table4"], runs, expected, written.get("protocols"))
        )
    log.info("published %d run(s) of %s into %s", len(runs), ", ".join(map(str, results_dirs)), out_dir)
    return {"runs": len(runs), **written}


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", help="the study run's results directory (and others, e.g. a later rung's)")
    p.add_argument(
        "--refresh",
        dest="refresh_only",
        action="store_true",
        help="rewrite Table 1, provenance and the page from --out alone (after verify_published record)",
    )
    p.add_argument(
        "--add",
        dest="add_only",
        action="store_true",
        help="add the runs of --results whose entries are new to --out (refit and study runs), then refresh",
    )
    p.add_argument("--out", default="reports/study", help="the folder to (re)write")
    p.add_argument(
        "--expected",
        type=int,
        default=None,
        help="runs the study has in all (default: every seed of every entry in the run)",
    )
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
