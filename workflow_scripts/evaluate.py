"""Evaluate one trained model on the untouched test set with scikit-learn.

Writes a metrics JSON (accuracy, log loss, macro and weighted F1, per-class
precision/recall/F1/support, confusion matrix; the train and validation numbers of the
kept epoch and the epochs run, from the history; model size; provenance) and the test-set
probabilities as .npz for later analysis.

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
from cnnstudy.io import atomic_path, read_json, write_json

log = logging.getLogger("cnnstudy.evaluate")


TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per test image


def _crop(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The images moved by (dy, dx) pixels, |d| <= 1, the border filled by reflection."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = x.shape[1:3]
    return padded[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def predict_views(model, x: np.ndarray, batch_size: int, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
    """(probabilities with TTA, probabilities of the plain images): one pass per view.

    flip: the mean over the image and its mirror image. flip_translate (airbench's level 2):
    half that, plus a quarter each of the same pair for the image moved one pixel down-right
    and one pixel up-left.
    """

    def run(images):
        return model.predict(images, batch_size=batch_size, verbose=0).astype(np.float64)

    def with_mirror(images, plain=None):
        return ((run(images) if plain is None else plain) + run(images[:, :, ::-1, :])) / 2

    plain = run(x)
    probs = plain if tta == "none" else with_mirror(x, plain)
    if tta == "flip_translate":
        probs = probs / 2 + (with_mirror(_crop(x, 1, 1)) + with_mirror(_crop(x, -1, -1))) / 4
    # float32 softmax rows, renormalised in float64
    return probs / probs.sum(axis=1, keepdims=True), plain / plain.sum(axis=1, keepdims=True)


def predict(model, x: np.ndarray, batch_size: int, tta: str = "none") -> np.ndarray:
    """Class probabilities, averaged over the test-time augmentation views (see predict_views)."""
    return predict_views(model, x, batch_size, tta)[0]


def history_row(history, epoch: int) -> dict:
    row = history.loc[history["epoch"] == epoch]
    if row.empty:
        raise cli.JobError(f"epoch {epoch} is not in the training history")
    row = row.iloc[0]
    return {key: float(row[key]) for key in ("accuracy", "loss", "val_accuracy", "val_loss")}


def classification_metrics(labels: np.ndarray, probs: np.ndarray, class_names: list[str]) -> dict:
    predicted = probs.argmax(axis=1)
    k = len(class_names)
    report = skm.classification_report(
        labels, predicted, labels=range(k), target_names=class_names, output_dict=True, zero_division=0
    )
    return {
        "accuracy": skm.accuracy_score(labels, predicted),
        "loss": skm.log_loss(labels, probs, labels=range(k)),
        "f1_macro": skm.f1_score(labels, predicted, average="macro", zero_division=0),
        "f1_weighted": skm.f1_score(labels, predicted, average="weighted", zero_division=0),
        "per_class": {name: report[name] for name in class_names},
        "confusion_matrix": skm.confusion_matrix(labels, predicted, labels=range(k)).tolist(),
    }


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
    batch_size: int = 500,
) -> dict:
    for path in (data, manifest, model, history, train_info):
        if not Path(path).is_file():
            raise FileNotFoundError(f"missing input {path}")
    intra, _ = runtime.configure_threads(threads)
    import keras
    import pandas as pd

    from cnnstudy import models  # noqa: F401  (registers the workflow's custom layers)

    info = read_json(train_info)
    runtime.set_precision(info["precision"])
    net = keras.saving.load_model(model, compile=False)
    with np.load(data) as arrays:
        x_test, labels = arrays["x_test"], arrays["labels_test"]
        class_names = [str(c) for c in arrays["class_names"]]

    start = time.perf_counter()
    probs, plain = predict_views(net, x_test, batch_size, tta)
    seconds = time.perf_counter() - start
    test = classification_metrics(labels, probs, class_names)
    if tta != "none":
        test["accuracy_without_tta"] = skm.accuracy_score(labels, plain.argmax(axis=1))

    hist = pd.read_csv(history)
    kept = info["kept_epoch"]
    result = {
        "model": info["model"],
        "seed": info["seed"],
        "test": test,
        "kept_epoch": {"epoch": kept, **history_row(hist, kept)},
        "last_epoch": {"epoch": int(hist["epoch"].iloc[-1]), **history_row(hist, int(hist["epoch"].iloc[-1]))},
        "epochs_run": int(len(hist)),
        "epochs_requested": info["epochs_requested"],
        "stopped_early": info["stopped_early"],
        "train_seconds": info["train_seconds"],
        "train_images_per_s": float(hist["images_per_s"].iloc[1:].median() if len(hist) > 1 else hist["images_per_s"].iloc[0]),
        "params": net.count_params(),
        "layers": len(net.layers),
        "tta": tta,
        "eval_images_per_s": len(x_test) * TTA_VIEWS[tta] / seconds,
        "n_test": int(len(labels)),
        "provenance": provenance.collect(info, read_json(manifest), eval_threads=intra),
    }
    if "test_accuracy" in hist:  # entries with time_to_accuracy: test accuracy after each epoch
        result["time_to_accuracy"] = [
            {"epoch": int(e), "train_seconds": float(s), "test_accuracy": float(a)}
            for e, s, a in zip(hist["epoch"], hist["epoch_time"].cumsum(), hist["test_accuracy"])
        ]
    with atomic_path(probs_out, suffix=".npz") as tmp, open(tmp, "wb") as fh:
        np.savez(fh, probs=probs.astype(np.float32), labels=labels, class_names=np.array(class_names))
    write_json(metrics_out, result)
    log.info(
        "%s seed %d: test accuracy %.4f, loss %.4f, macro F1 %.4f (%d images, %.0f img/s)",
        result["model"], result["seed"], test["accuracy"], test["loss"], test["f1_macro"], len(labels),
        result["eval_images_per_s"],
    )  # fmt: skip
    return result


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("data", "manifest", "model", "history", "train-info", "metrics-out", "probs-out"):
        p.add_argument(f"--{name}", required=True)
    p.add_argument("--tta", default="none", choices=sorted(TTA_VIEWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=500)
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
