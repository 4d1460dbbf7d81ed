"""Evaluate one trained model on the validation split and the untouched test set with scikit-learn.

Both splits are predicted by one function (cnnstudy.predict: the model's test-time
augmentation, if its entry has one), so validation and test numbers are measured alike:
accuracy, log loss (categorical cross-entropy, no label smoothing) of the very probabilities
that give the accuracy, macro and weighted F1; for the test set also per-class
precision/recall/F1/support and the confusion matrix. The training history's numbers at the
kept epoch, the training summary and provenance (training and evaluation) are joined in. The
test-set probabilities are kept as .npz for later analysis (paired tests between models).
A refit or study run (cnnstudy.protocols) trained on the validation split's images: it is
evaluated on the test set alone, its "val" is null, and "protocol" says how it was trained
(a study run's is marked test_selected: the test set chose its epochs).

    python workflow_scripts/evaluate.py --data results/data/cifar10.npz --manifest results/data/cifar10.json \\
        --model model.keras --history history.csv --train-info train_info.json \\
        --metrics-out metrics.json --probs-out test_probs.npz --tta none --threads 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np
from sklearn import metrics as skm

from cnnstudy import cli, provenance, runtime
from cnnstudy.errors import JobError
from cnnstudy.files import atomic_path, read_json, write_json

log = logging.getLogger("cnnstudy.evaluate")

# From the history at the kept epoch: Keras' running means over the epoch's batches, in
# training mode (augmentation and dropout active, raw weights), and its validation pass.
HISTORY_COLUMNS = ("accuracy", "loss", "cross_entropy", "val_accuracy", "val_loss", "val_cross_entropy")


def history_row(history, epoch: int) -> dict:
    row = history.loc[history["epoch"] == epoch]
    if row.empty:
        raise JobError(f"epoch {epoch} is not in the training history")
    row = row.iloc[0]
    return {key: float(row[key]) for key in HISTORY_COLUMNS if key in row}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str], detail: bool = True) -> dict:
    predicted = probs.argmax(axis=1)
    k = len(class_names)
    result = {
        "accuracy": skm.accuracy_score(labels, predicted),
        "loss": skm.log_loss(labels, probs, labels=range(k)),
        "f1_macro": skm.f1_score(labels, predicted, average="macro", zero_division=0),
        "f1_weighted": skm.f1_score(labels, predicted, average="weighted", zero_division=0),
    }
    if detail:
        report = skm.classification_report(
            labels, predicted, labels=range(k), target_names=class_names, output_dict=True, zero_division=0
        )
        result["per_class"] = {name: report[name] for name in class_names}
        result["confusion_matrix"] = skm.confusion_matrix(labels, predicted, labels=range(k)).tolist()
    return result


def _data_provenance(manifest: dict) -> dict:
    keys = ("raw_md5", "counts", "val_fraction", "split_seed", "subset")
    return {"npz_md5": manifest.get("md5"), **{key: manifest.get(key) for key in keys}}


def main(
    data: str,
    manifest: str,
    model: str,
    history: str,
    train_info: str,
    metrics_out: str,
    probs_out: str,
    tta: str = "none",
    threads: int = 2,
) -> dict:
    for path in (data, manifest, model, history, train_info):
        if not Path(path).is_file():
            raise FileNotFoundError(f"missing input {path}")
    info = read_json(train_info)
    runtime.select_backend(info.get("backend", "tensorflow"))  # the training job's: before Keras is imported
    intra, _ = runtime.configure_threads(threads)
    import keras
    import pandas as pd

    from cnnstudy import models, predict  # noqa: F401  (models registers the workflow's custom layers)

    runtime.set_precision(info["precision"])
    net = keras.saving.load_model(model, compile=False, safe_mode=True)  # no arbitrary code from the file
    protocol = info.get("protocol") or {"name": "holdout"}  # runs from before protocols: holdout
    # Refit and study runs trained on the validation split's images: no validation metrics.
    evaluated = ("val", "test") if protocol["name"] == "holdout" else ("test",)
    with np.load(data) as arrays:
        splits = {split: (arrays[f"x_{split}"], arrays[f"labels_{split}"]) for split in evaluated}
        class_names = [str(c) for c in arrays["class_names"]]
    results, seconds, (test_probs, test_labels) = evaluate_splits(net, splits, class_names, tta)
    hist = pd.read_csv(history)
    result = {
        "model": info["model"],
        "seed": info["seed"],
        "test": results["test"],
        "val": results.get("val"),  # None: the run trained on the validation images (refit, study)
        "protocol": protocol,
        **training_summary(info, hist),
        "params": net.count_params(),
        "layers": len(net.layers),
        "tta": tta,
        "eval_images_per_s": sum(len(x) for x, _ in splits.values()) * predict.TTA_VIEWS[tta] / seconds,
        "n_train": info["n_train"],
        "n_val": int(len(splits["val"][1])) if "val" in splits else 0,
        "n_test": int(len(test_labels)),
        "provenance": run_provenance(info, read_json(manifest), intra),
    }
    if "test_accuracy" in hist:  # entries with time_to_accuracy: the evaluated model's test accuracy per epoch
        result["time_to_accuracy"] = time_to_accuracy(hist, info.get("images_per_epoch", info["n_train"]))
    with atomic_path(probs_out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, probs=test_probs.astype(np.float32), labels=test_labels, class_names=np.array(class_names))
    write_json(metrics_out, result)
    log.info(
        "%s seed %d (%s): test accuracy %.4f, loss %.4f, macro F1 %.4f; validation accuracy %s (%.0f img/s)%s",
        result["model"], result["seed"], protocol["name"], results["test"]["accuracy"], results["test"]["loss"],
        results["test"]["f1_macro"], f"{results['val']['accuracy']:.4f}" if "val" in results else "none",
        result["eval_images_per_s"], "; test-selected: its epochs were chosen on the test set" if protocol.get("test_selected") else "",
    )  # fmt: skip
    return result


def run_provenance(info: dict, manifest: dict, intra: int) -> dict:
    """Where the result comes from: the training job's record, the data, and this evaluation."""
    return {
        "seed": info["seed"],
        "spec_hash": info["spec_hash"],
        "device": info["device"],
        "precision": info["precision"],
        "threads": info["threads"],
        "data": _data_provenance(manifest),
        "training": info.get("provenance", {}),
        "evaluation": provenance.record("evaluate.py", packages=False, threads=intra),
    }


def evaluate_splits(net, splits: dict, class_names: list[str], tta: str) -> tuple[dict, float, tuple]:
    """Each split's metrics (the test split's in detail), the seconds predicting took, and the test
    split's probabilities and labels."""
    from cnnstudy import predict

    results, seconds, test = {}, 0.0, None
    for split, (x, labels) in splits.items():
        start = time.perf_counter()
        probs, plain = predict.predict_views(net, x, tta)
        seconds += time.perf_counter() - start
        results[split] = classification_metrics(labels, probs, class_names, detail=split == "test")
        if tta != "none":
            results[split]["accuracy_without_tta"] = skm.accuracy_score(labels, plain.argmax(axis=1))
        if split == "test":
            test = (probs, labels)
    return results, seconds, test


def training_summary(info: dict, hist) -> dict:
    """What the training job's history and record say: the kept and the last epoch's rows, epochs,
    time and the median epoch's speed."""
    kept, last = info["kept_epoch"], int(hist["epoch"].iloc[-1])
    speeds = hist["images_per_s"].iloc[1:] if len(hist) > 1 else hist["images_per_s"]  # epoch 1 includes tracing
    return {
        "kept_epoch": {"epoch": kept, **history_row(hist, kept)},
        "last_epoch": {"epoch": last, **history_row(hist, last)},
        "epochs_run": int(len(hist)),
        "epochs_requested": info["epochs_requested"],
        "stopped_early": info["stopped_early"],
        "train_seconds": info["train_seconds"],
        "train_images_per_s": float(speeds.median()),
    }


def time_to_accuracy(hist, images_per_epoch: int) -> list[dict]:
    """The evaluated model's test accuracy after each epoch, with the training seconds and images
    it took (entries with time_to_accuracy record it; it never chose anything)."""
    return [
        {"epoch": int(e), "train_seconds": float(s), "images": int(e) * images_per_epoch, "test_accuracy": float(a)}
        for e, s, a in zip(hist["epoch"], hist["epoch_time"].cumsum(), hist["test_accuracy"], strict=True)
    ]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("data", "manifest", "model", "history", "train-info", "metrics-out", "probs-out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--tta", default="none", choices=["none", "flip", "flip_translate"])
    p.add_argument("--threads", type=int, default=2)
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser(), unused=("jax", "matplotlib")))
