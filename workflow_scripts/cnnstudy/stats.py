"""Statistics of Table 4 ("did each step help?"): paired tests of two models on the same test images.

Every entry is compared with the entry it changes (its ``compare_to``, else its ``base``):

- the difference in test accuracy of one seed (the lowest both have), with a 95 % paired
  bootstrap interval over the test images (scipy.stats.bootstrap, BCa, paired);
- McNemar's exact test on the same predictions (statsmodels), Holm-corrected for the
  number of steps (statsmodels' multipletests);
- where an entry has several seeds, the difference of the means over seeds, and the difference of
  every pair of runs (same seed where both have it; a single-seed entry against each seed of the
  other): whether the step keeps its sign from one training run to the next.

Verdict: "improved" / "worse" when the Holm-corrected p < 0.05 (the sign of the difference
says which), else "no significant change". A single seed's interval covers test-set
sampling only, not training noise: the seed spread of entries with several seeds shows how
large that is (the footnote gives it).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from . import configuration

ALPHA = 0.05
RESAMPLES = 9999
VERDICTS = ("improved", "no significant change", "worse")


def paired(correct_new: np.ndarray, correct_ref: np.ndarray, seed: int = 0) -> dict:
    """Accuracy difference (new - reference) on the same images, its paired bootstrap 95 %
    interval and McNemar's exact p-value."""
    a, b = correct_new.astype(float), correct_ref.astype(float)
    from scipy import stats
    from statsmodels.stats.contingency_tables import mcnemar

    ci = stats.bootstrap(
        (a, b),
        lambda x, y, axis: x.mean(axis=axis) - y.mean(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=RESAMPLES,
        confidence_level=0.95,
        method="BCa",
        batch=100,
        rng=np.random.default_rng(seed),
    ).confidence_interval
    only_new = int(np.sum(correct_new & ~correct_ref))
    only_ref = int(np.sum(~correct_new & correct_ref))
    both, neither = int(np.sum(correct_new & correct_ref)), int(np.sum(~correct_new & ~correct_ref))
    p = mcnemar(np.array([[both, only_new], [only_ref, neither]]), exact=True).pvalue
    return {
        "diff": float(a.mean() - b.mean()),
        "ci_low": float(ci.low),
        "ci_high": float(ci.high),
        "only_new": only_new,
        "only_ref": only_ref,
        "p": float(p),
    }


def verdict(diff: float, p_holm: float) -> str:
    if p_holm >= ALPHA or diff == 0:
        return "no significant change"
    return "improved" if diff > 0 else "worse"


def steps(models: dict) -> list[tuple[str, str]]:
    """(entry, the entry it changes), in config order."""
    pairs = []
    for name, spec in models.items():
        if not configuration.in_study_tables(spec):  # sweep points, refit and study runs: their own tables
            continue
        reference = spec.get("compare_to") or spec.get("base")
        if reference in models:
            pairs.append((name, reference))
    return pairs


def run_pairs(name: str, reference: str, runs: dict) -> list[tuple]:
    """The (entry, seed) pairs to difference: the same seed where both have it; an entry with one
    seed against every seed of the other."""
    new, ref = sorted(s for m, s in runs if m == name), sorted(s for m, s in runs if m == reference)
    if len(new) == 1 or len(ref) == 1:
        return [((name, a), (reference, b)) for a in new for b in ref]
    return [((name, s), (reference, s)) for s in new if s in ref]


def steps_frame(models: dict, runs: pd.DataFrame, correct: dict) -> pd.DataFrame:
    """One row per step: the paired test on the lowest seed both have, the means over seeds, the verdict.

    ``runs``: one row per (model, seed) with its test_accuracy; ``correct``: (model, seed) ->
    whether each test image was classified right.
    """
    from statsmodels.stats.multitest import multipletests

    accuracy = {model: group["test_accuracy"].tolist() for model, group in runs.groupby("model")} if len(runs) else {}
    by_run = {(r["model"], r["seed"]): r["test_accuracy"] for _, r in runs.iterrows()}
    rows = []
    for name, reference in steps(models):
        diffs = [by_run[a] - by_run[b] for a, b in run_pairs(name, reference, by_run)]
        seeds = sorted({s for m, s in correct if m == name} & {s for m, s in correct if m == reference})
        if not seeds:
            continue
        claim = models[name].get("claim") or {}
        new, ref = accuracy[name], accuracy[reference]
        published = [(models[m].get("published") or {}).get("val_accuracy", np.nan) for m in (name, reference)]
        rows.append(
            {
                "model": name,
                "compared_to": reference,
                "note": models[name].get("note", ""),
                "study_claim": claim.get("verdict", ""),
                "study_says": claim.get("says", ""),
                "study_diff": published[0] - published[1],
                "seed": seeds[0],
                **paired(correct[(name, seeds[0])], correct[(reference, seeds[0])]),
                "n_new": len(new),
                "n_ref": len(ref),
                "mean_diff": float(np.mean(new) - np.mean(ref)),
                "std_new": float(np.std(new, ddof=1)) if len(new) > 1 else np.nan,
                "std_ref": float(np.std(ref, ddof=1)) if len(ref) > 1 else np.nan,
                "diff_per_seed": " / ".join(f"{d:+.4f}" for d in diffs),
                "sign_holds": all(d > 0 for d in diffs) or all(d < 0 for d in diffs),
            }
        )
    frame = pd.DataFrame(rows)
    if len(frame):
        frame["p_holm"] = multipletests(frame["p"], alpha=ALPHA, method="holm")[1]
        frame["verdict"] = [verdict(d, p) for d, p in zip(frame["diff"], frame["p_holm"], strict=True)]
        frame["agrees"] = [(c == v) if c else None for c, v in zip(frame["study_claim"], frame["verdict"], strict=True)]
    return frame


def footnote(frame: pd.DataFrame, runs: pd.DataFrame) -> str:
    noise = []
    for model, group in runs.groupby("model") if len(runs) else ():
        if len(group) > 1:
            accs = group["test_accuracy"]
            noise.append(f"{model}: {accs.mean():.4f} ± {accs.std(ddof=1):.4f} over {len(accs)} seeds")
    spread = ("Training noise, as the seed spread of test accuracy: " + "; ".join(noise) + ". ") if noise else ""
    return (
        "Each entry against the entry it changes, on the same test images and the same seed. Δ: test "
        "accuracy of the entry minus that of the one it changes; 95 % CI: paired bootstrap (BCa, "
        f"{RESAMPLES} resamples); McNemar p: exact test on the images only one of the two got right; Holm p: "
        f"corrected for the {len(frame)} steps. Verdict: improved or worse when Holm p < {ALPHA}, else no "
        "significant change. These intervals cover the sampling of test images for one training run each, "
        f"not training noise. {spread}Δ per pair of runs (entries with several seeds): the difference of every "
        "pair of training runs (same seed where both have it; a single-seed entry against each seed of the "
        "other): a step whose sign changes between pairs is within training noise, whatever its verdict. "
        "The study's claims are read from its text (its words are in the CSV's "
        "study_says column); its own numbers came from single runs validated on the test set. Study's Δ: "
        "the difference of the two entries' validation accuracies as the study published them (its test set, "
        "one run each, no test behind it)."
    )
