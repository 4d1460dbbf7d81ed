"""Table 4: did each step of the ladder help? Paired tests on the same test images.

Every entry is compared with the entry it changes (its ``compare_to``, else its ``base``):

- the difference in test accuracy of one seed (the lowest both have), with a 95 % paired
  bootstrap interval over the 10 000 test images (scipy.stats.bootstrap, BCa, paired);
- McNemar's exact test on the same predictions (statsmodels), Holm-corrected for the
  number of steps (statsmodels' multipletests);
- where an entry has several seeds, the difference of the means over seeds.

Verdict: "improved" / "worse" when the Holm-corrected p < 0.05 (the sign of the difference
says which), else "no significant change". A single seed's interval covers test-set
sampling only, not training noise: the seed spread of entries with several seeds shows how
large that is, and the table's footnote gives it.

    python workflow_scripts/steps.py --models results/specs/models.json \\
        --metrics results/metrics/*/seed_*/metrics.json --probs results/metrics/*/seed_*/test_probs.npz \\
        --outdir reports --plot results/plots/steps_forest.png
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402
from statsmodels.stats.contingency_tables import mcnemar  # noqa: E402
from statsmodels.stats.multitest import multipletests  # noqa: E402

from cnnstudy import cli  # noqa: E402
from cnnstudy.io import atomic_path, read_json  # noqa: E402
from report import cell, write_table  # noqa: E402

log = logging.getLogger("cnnstudy.steps")

ALPHA = 0.05
RESAMPLES = 9999
TITLE = "Table 4 - Did each step help? Paired tests on the test set"
VERDICTS = ("improved", "no significant change", "worse")


def paired(correct_new: np.ndarray, correct_ref: np.ndarray, seed: int = 0) -> dict:
    """Accuracy difference (new - reference) on the same images, its paired bootstrap 95 %
    interval and McNemar's exact p-value."""
    a, b = correct_new.astype(float), correct_ref.astype(float)
    ci = stats.bootstrap(
        (a, b), lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis), paired=True, vectorized=True,
        n_resamples=RESAMPLES, confidence_level=0.95, method="BCa", batch=100, rng=np.random.default_rng(seed),
    ).confidence_interval  # fmt: skip
    only_new = int(np.sum(correct_new & ~correct_ref))
    only_ref = int(np.sum(~correct_new & correct_ref))
    both, neither = int(np.sum(correct_new & correct_ref)), int(np.sum(~correct_new & ~correct_ref))
    p = mcnemar(np.array([[both, only_new], [only_ref, neither]]), exact=True).pvalue
    return {"diff": float(a.mean() - b.mean()), "ci_low": float(ci.low), "ci_high": float(ci.high),
            "only_new": only_new, "only_ref": only_ref, "p": float(p)}  # fmt: skip


def verdict(diff: float, p_holm: float) -> str:
    if p_holm >= ALPHA or diff == 0:
        return "no significant change"
    return "improved" if diff > 0 else "worse"


def steps(models: dict) -> list[tuple[str, str]]:
    """(entry, the entry it changes), in config order."""
    pairs = []
    for name, spec in models.items():
        reference = spec.get("compare_to") or spec.get("base")
        if reference in models:
            pairs.append((name, reference))
    return pairs


def load_runs(metrics: list[str], probs: list[str]) -> dict:
    """{(model, seed): (test accuracy, per-image correctness)}; every run on the same labels."""
    runs, labels = {}, None
    for metrics_path, probs_path in zip(metrics, probs, strict=True):
        m = read_json(metrics_path)
        with np.load(probs_path) as saved:
            if labels is None:
                labels = saved["labels"]
            elif not np.array_equal(labels, saved["labels"]):
                raise cli.JobError(f"{probs_path}: predictions of other test images than the first run's")
            correct = saved["probs"].argmax(axis=1) == saved["labels"]
        runs[(m["model"], m["seed"])] = (m["test"]["accuracy"], correct)
    return runs


def table(models: dict, runs: dict) -> pd.DataFrame:
    rows = []
    for name, reference in steps(models):
        seeds = sorted({s for m, s in runs if m == name} & {s for m, s in runs if m == reference})
        if not seeds:
            continue
        seed = seeds[0]
        test = paired(runs[(name, seed)][1], runs[(reference, seed)][1])
        acc = {model: [a for (m, _), (a, _) in runs.items() if m == model] for model in (name, reference)}
        claim = models[name].get("claim") or {}
        rows.append({
            "model": name, "compared_to": reference, "note": models[name].get("note", ""),
            "study_claim": claim.get("verdict", ""), "study_says": claim.get("says", ""), "seed": seed, **test,
            "n_new": len(acc[name]), "n_ref": len(acc[reference]),
            "mean_diff": float(np.mean(acc[name]) - np.mean(acc[reference])),
            "std_new": float(np.std(acc[name], ddof=1)) if len(acc[name]) > 1 else np.nan,
            "std_ref": float(np.std(acc[reference], ddof=1)) if len(acc[reference]) > 1 else np.nan,
        })  # fmt: skip
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["p_holm"] = multipletests(frame["p"], alpha=ALPHA, method="holm")[1]
        frame["verdict"] = [verdict(d, p) for d, p in zip(frame["diff"], frame["p_holm"])]
        frame["agrees"] = [(c == v) if c else None for c, v in zip(frame["study_claim"], frame["verdict"])]
    return frame


def display(frame: pd.DataFrame) -> pd.DataFrame:
    shown = []
    for _, r in frame.iterrows():
        several = r["n_new"] > 1 or r["n_ref"] > 1
        shown.append({
            "Step": f"{r['model']} vs {r['compared_to']}",
            "Change": r["note"],
            "Study's claim": r["study_claim"] or "(beyond the study)",
            "Our verdict": r["verdict"],
            "Agrees": {True: "yes", False: "no", None: ""}[r["agrees"]],
            "Δ test acc. (seed)": f"{r['diff']:+.4f} (seed {r['seed']})",
            "95 % CI": f"[{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]",
            "Only new right / only old right": f"{r['only_new']} / {r['only_ref']}",
            "McNemar p": f"{r['p']:.2g}",
            "Holm p": f"{r['p_holm']:.2g}",
            "Δ mean over seeds": f"{r['mean_diff']:+.4f} (n {r['n_new']} vs {r['n_ref']})" if several else "",
        })  # fmt: skip
    return pd.DataFrame(shown)


def footnote(frame: pd.DataFrame, runs: dict) -> str:
    n_images = len(next(iter(runs.values()))[1]) if runs else 0
    noise = []
    for model in sorted({m for m, _ in runs}):
        accs = [a for (m, _), (a, _) in runs.items() if m == model]
        if len(accs) > 1:
            noise.append(f"{model}: {cell(np.mean(accs), np.std(accs, ddof=1), 4)} over {len(accs)} seeds")
    spread = ("Training noise, as the seed spread of test accuracy: " + "; ".join(noise) + ". ") if noise else ""
    return (
        f"Each entry against the entry it changes, on the same {n_images:,} test images and the same seed. Δ: test "
        "accuracy of the entry minus that of the one it changes; 95 % CI: paired bootstrap (BCa, "
        f"{RESAMPLES} resamples); McNemar p: exact test on the images only one of the two got right; Holm p: "
        f"corrected for the {len(frame)} steps. Verdict: improved or worse when Holm p < {ALPHA}, else no "
        "significant change. These intervals cover the sampling of test images for one training run each, "
        f"not training noise. {spread}The study's claims are read from its text (see its 'says' column in "
        "the CSV); its own numbers came from single runs validated on the test set."
    )


def forest(frame: pd.DataFrame, path: Path) -> None:
    colours = {"improved": "tab:green", "no significant change": "tab:grey", "worse": "tab:red"}
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(frame) + 1.2))
    for y, (_, r) in enumerate(frame.iloc[::-1].iterrows()):
        ax.errorbar(r["diff"], y, xerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]], fmt="o",
                    color=colours[r["verdict"]], capsize=3)  # fmt: skip
    ax.set_yticks(range(len(frame)), [f"{m} vs {c}" for m, c in zip(frame["model"][::-1], frame["compared_to"][::-1])])
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("difference in test accuracy (95 % paired bootstrap interval)")
    ax.set_title("Did each step help? (green: improved, grey: no significant change, red: worse)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(models: str, metrics: list[str], probs: list[str], outdir: str, plot: str) -> pd.DataFrame:
    info = read_json(models)
    runs = load_runs(metrics, probs)
    frame = table(info, runs)
    shown = display(frame) if len(frame) else pd.DataFrame(columns=["Step"])
    write_table(shown, frame, Path(outdir) / "table4", TITLE, footnote(frame, runs))
    if len(frame):
        forest(frame, Path(plot))
    else:  # nothing to compare (e.g. a run of one model): an empty figure, so the output exists
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no steps to compare", ha="center")
        with atomic_path(plot, suffix=".png") as tmp:
            fig.savefig(tmp)
        plt.close(fig)
    log.info("table 4: %d step(s) -> %s", len(frame), Path(outdir) / "table4.*")
    return frame


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", required=True)
    p.add_argument("--metrics", nargs="+", required=True)
    p.add_argument("--probs", nargs="+", required=True, help="test_probs.npz files, in the order of --metrics")
    p.add_argument("--outdir", required=True)
    p.add_argument("--plot", required=True)
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
