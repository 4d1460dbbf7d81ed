"""The report's figures: learning curves, confusion matrices, the ladder (overlay of validation
curves; the study's accuracy beside ours), Table 4's forest plot, per-class F1. Drawn by the
plots rule (workflow_scripts/plots.py) and by tools/publish.py."""

from __future__ import annotations

import logging
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from . import configuration  # noqa: E402
from .files import atomic_path, read_json  # noqa: E402

log = logging.getLogger("cnnstudy.plots")


def _save(fig, path: Path) -> None:
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)


def learning_curve(
    history: pd.DataFrame, title: str, path: Path, kept_epoch: int | None = None, validation: str = "validation"
) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(9.5, 3.4), gridspec_kw={"wspace": 0.3})
    # Cross-entropy without label smoothing where recorded: train and validation measured alike.
    loss = "cross_entropy" if "cross_entropy" in history else "loss"
    for ax, metric in zip(axes, (loss, "accuracy"), strict=True):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.plot(history["epoch"], history[metric], marker=".", label="train")
        if f"val_{metric}" in history:  # a refit has no validation; a study run's is the test set
            ax.plot(history["epoch"], history[f"val_{metric}"], marker=".", label=validation)
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="grey", linestyle=":", label=f"kept epoch {kept_epoch}")
        if "phase" in history and history["phase"].nunique() > 1:
            ax.axvline(history.loc[history["phase"] == 2, "epoch"].min() - 0.5, color="black", alpha=0.3)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[1].legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    _save(fig, path)


def confusion(matrix: np.ndarray, class_names: list[str], title: str, path: Path) -> None:
    """Row-normalised: each row shows how the images of one true class were classified."""
    rows = matrix.sum(axis=1, keepdims=True)
    norm = np.divide(matrix, rows, out=np.zeros_like(matrix, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.6, 5))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    for i in range(len(class_names)):
        for j in range(len(class_names)):
            ax.text(
                j,
                i,
                f"{norm[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=6.5,
                color="white" if norm[i, j] > 0.5 else "black",
            )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(image, ax=ax, fraction=0.046)
    ax.set_title(title)
    _save(fig, path)


def overlay(histories: dict[str, pd.DataFrame], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    colors = plt.cm.viridis(np.linspace(0, 0.95, max(1, len(histories))))
    for color, (name, history) in zip(colors, histories.items(), strict=False):
        axes[0].plot(history["epoch"], history["val_loss"], color=color, label=name)
        axes[1].plot(history["epoch"], history["val_accuracy"], color=color, label=name)
    for ax, label in zip(axes, ("validation loss", "validation accuracy"), strict=True):
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    if histories:
        axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Table 1 models: validation curves (first seed)")
    _save(fig, path)


def ladder(info: dict, metrics: dict[str, list[dict]], path: Path) -> None:
    """The whole ladder at a glance: the study's validation accuracy per rung beside ours
    (validation and test, mean over seeds)."""
    names = [n for n in info if info[n]["table"] == 1 and configuration.in_study_tables(info[n]) and n in metrics]
    x = np.arange(len(names))
    study = [(info[n].get("published") or {}).get("val_accuracy") or np.nan for n in names]
    ours = {split: [np.mean([m[split]["accuracy"] for m in metrics[n]]) for n in names] for split in ("val", "test")}
    fig, ax = plt.subplots(figsize=(max(6, 0.75 * len(names) + 2), 3.8))
    for offset, values, label in (
        (-0.27, study, "study: val. accuracy (its test set)"),
        (0.0, ours["val"], "ours: val. accuracy (held-out 10 %)"),
        (0.27, ours["test"], "ours: test accuracy"),
    ):
        ax.bar(x + offset, values, width=0.27, label=label)
    ax.set_xticks(x, [n.replace("model_", "#") for n in names])
    ax.set_ylim(0, 1.12)  # room above the bars for the legend, which hid the last rungs' bars at the bottom
    ax.set_yticks(np.arange(0, 1.01, 0.2))
    ax.set_ylabel("accuracy")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", ncols=3)
    ax.set_title("The ladder: the study's accuracy per rung and ours")
    _save(fig, path)


def forest(frame: pd.DataFrame, path: Path) -> None:
    """Table 4's steps: each difference in test accuracy with its paired bootstrap interval."""
    if frame.empty:  # nothing to compare (e.g. a run of one model): the figure says so
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no steps to compare", ha="center")
        _save(fig, path)
        return
    colours = {"improved": "tab:green", "no significant change": "tab:grey", "worse": "tab:red"}
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * len(frame) + 1.2))
    for y, (_, r) in enumerate(frame.iloc[::-1].iterrows()):
        ax.errorbar(
            r["diff"],
            y,
            xerr=[[r["diff"] - r["ci_low"]], [r["ci_high"] - r["diff"]]],
            fmt="o",
            color=colours[r["verdict"]],
            capsize=3,
        )
        if r.get("n_new", 1) > 1 or r.get("n_ref", 1) > 1:  # training noise: every pair of runs of the step
            pairs = [float(d) for d in str(r["diff_per_seed"]).split("/")]
            ax.plot(
                pairs,
                [y - 0.25] * len(pairs),
                "x",
                color="black",
                markersize=5,
                gid="run_pairs",
                label="each pair of training runs" if not ax.get_legend_handles_labels()[0] else None,
            )
    ax.set_yticks(
        range(len(frame)),
        [f"{m} vs {c}" for m, c in zip(frame["model"][::-1], frame["compared_to"][::-1], strict=True)],
    )
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("difference in test accuracy (95 % paired bootstrap interval)")
    ax.set_title("Did each step help? (green: improved, grey: no significant change, red: worse)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="best")
    _save(fig, path)


def sweeps(info: dict, metrics: dict[str, list[dict]], path: Path) -> None:
    """Validation accuracy against each swept setting (mean ± std over seeds): one row of panels
    per sweep, one line per combination of its other settings."""
    by_sweep: dict[str, list[str]] = {}
    for name, entry in info.items():
        if configuration.in_sweep_table(entry) and name in metrics:
            by_sweep.setdefault(entry["sweep"], []).append(name)
    if not by_sweep:
        fig = plt.figure(figsize=(4, 1))
        fig.text(0.5, 0.5, "no sweeps in this run", ha="center")
        _save(fig, path)
        return
    width = max(len(info[names[0]]["sweep_params"]) for names in by_sweep.values())
    fig, axes = plt.subplots(len(by_sweep), width, figsize=(4.6 * width, 3.4 * len(by_sweep)), squeeze=False)
    for row, (sweep, names) in enumerate(by_sweep.items()):
        params = list(info[names[0]]["sweep_params"])
        for col, param in enumerate(params):
            ax, others = axes[row][col], [p for p in params if p != param]
            values = list(dict.fromkeys(info[n]["sweep_params"][param] for n in names))
            lines: dict[tuple, dict] = {}
            for n in names:
                key = tuple(info[n]["sweep_params"][p] for p in others)
                accs = [m["val"]["accuracy"] for m in metrics[n]]
                lines.setdefault(key, {})[info[n]["sweep_params"][param]] = (
                    np.mean(accs),
                    np.std(accs, ddof=1) if len(accs) > 1 else 0.0,
                )  # noqa: E501
            for key, points in lines.items():
                xs = [i for i, v in enumerate(values) if v in points]
                label = ", ".join(f"{p}={v}" for p, v in zip(others, key, strict=True)) or "all"
                ax.errorbar(
                    xs,
                    [points[values[i]][0] for i in xs],
                    yerr=[points[values[i]][1] for i in xs],
                    marker="o",
                    capsize=3,
                    label=label,
                )
            ax.set_xticks(range(len(values)), [str(v) for v in values])
            ax.set_xlabel(param)
            ax.set_ylabel("validation accuracy")
            ax.set_title(f"sweep {sweep}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for col in range(len(params), width):
            axes[row][col].axis("off")
    _save(fig, path)


def f1_heatmap(f1: pd.DataFrame, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(8, 0.42 * len(f1) + 1.6))
    image = ax.imshow(f1.values, cmap="viridis", vmin=0, vmax=1, aspect="auto")
    ax.set_xticks(range(f1.shape[1]), f1.columns, rotation=45, ha="right")
    ax.set_yticks(range(f1.shape[0]), f1.index)
    for i in range(f1.shape[0]):
        for j in range(f1.shape[1]):
            ax.text(
                j,
                i,
                f"{f1.values[i, j]:.2f}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if f1.values[i, j] < 0.6 else "black",
            )
    fig.colorbar(image, ax=ax, fraction=0.03, label="test F1")
    ax.set_title("Per-class test F1 (mean over seeds)")
    _save(fig, path)


def run_figures(m: dict, history: pd.DataFrame, entry: dict, out: Path) -> list[Path]:
    """One run's learning curve (curves/) and confusion matrix (confusion/) under ``out``."""
    name, seed = m["model"], m["seed"]
    curve, matrix = out / "curves" / f"{name}_seed{seed}.png", out / "confusion" / f"{name}_seed{seed}.png"
    test_selected = (m.get("protocol") or {}).get("test_selected")
    learning_curve(
        history,
        f"{name} (seed {seed}): {entry.get('note', '')}",
        curve,
        m["kept_epoch"]["epoch"],
        "test (study protocol)" if test_selected else "validation",
    )
    names = list(m["test"]["per_class"])
    confusion(
        np.array(m["test"]["confusion_matrix"]),
        names,
        f"{name} (seed {seed}), test accuracy {m['test']['accuracy']:.3f}",
        matrix,
    )
    return [curve, matrix]


def write_all(
    models: str, metrics: list[str], histories: list[str], outdir: str, steps: str | None = None
) -> list[Path]:
    """Every figure of the runs whose ``metrics`` and ``histories`` (same order) are given, into ``outdir``."""
    info = configuration.complete(read_json(models))
    out = Path(outdir)
    (out / "curves").mkdir(parents=True, exist_ok=True)
    (out / "confusion").mkdir(parents=True, exist_ok=True)
    by_run = {}
    for metrics_path, history_path in zip(metrics, histories, strict=True):
        m = read_json(metrics_path)
        by_run[(m["model"], m["seed"])] = (m, pd.read_csv(history_path))
    written = []
    for (name, _seed), (m, history) in by_run.items():
        written += run_figures(m, history, info[name], out)

    order = [n for n in info if any(n == k[0] for k in by_run)]
    first_seed = {n: min(s for (m, s) in by_run if m == n) for n in order}
    table1 = {
        n: by_run[(n, first_seed[n])][1]
        for n in order
        if info[n]["table"] == 1 and configuration.in_study_tables(info[n])
    }
    overlay(table1, out / "ladder_overlay.png")
    ladder(info, {n: [m for (k, _), (m, _) in by_run.items() if k == n] for n in order}, out / "ladder_accuracy.png")
    f1 = pd.DataFrame(
        {
            n: np.mean(
                [
                    [c["f1-score"] for c in by_run[(n, s)][0]["test"]["per_class"].values()]
                    for (m, s) in by_run
                    if m == n
                ],
                axis=0,
            )
            for n in order
        }
    ).T
    f1.columns = list(next(iter(by_run.values()))[0]["test"]["per_class"])
    f1_heatmap(f1, out / "f1_heatmap.png")
    sweeps(info, {n: [m for (k, _), (m, _) in by_run.items() if k == n] for n in order}, out / "sweeps.png")
    written += [out / "ladder_overlay.png", out / "ladder_accuracy.png", out / "f1_heatmap.png", out / "sweeps.png"]
    if steps:  # Table 4's numbers (report.py wrote them)
        frame = pd.read_csv(steps) if Path(steps).stat().st_size > 1 else pd.DataFrame()
        forest(frame, out / "steps_forest.png")
        written.append(out / "steps_forest.png")
    log.info("wrote %d figures into %s", len(written), out)
    return written
