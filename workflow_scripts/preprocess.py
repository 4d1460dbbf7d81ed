"""Turn the verified CIFAR-10 batches into one normalised .npz and a JSON manifest.

The npz holds float32 NHWC images in [0, 1] (x_train, x_val, x_test), one-hot float32
labels (y_*), the integer labels (labels_*) and class_names. Validation is a stratified
split of the five training batches; the test batch is never used for model selection.
Optional stratified subsets make quick runs and tests cheap.

    python workflow_scripts/preprocess.py --raw-dir resources/cifar-10-batches-py \\
        --out results/data/cifar10.npz --manifest results/data/cifar10.json
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from cnnstudy import cifar, cli
from cnnstudy.errors import JobError
from cnnstudy.files import atomic_path, md5sum, write_json

log = logging.getLogger("cnnstudy.preprocess")


def _stratified_subset(labels: np.ndarray, size: int | None, seed: int, split: str) -> np.ndarray:
    """Indices of a stratified subsample of ``size`` items (all, in order, when size is None)."""
    index = np.arange(len(labels))
    if size is None or size == len(labels):
        return index
    if size > len(labels):
        raise JobError(f"subset.{split}={size} is larger than the {len(labels)} images available")
    if size < cifar.NUM_CLASSES:
        raise JobError(f"subset.{split}={size}: need at least one image per class ({cifar.NUM_CLASSES})")
    chosen, _ = train_test_split(index, train_size=size, stratify=labels, random_state=seed)
    return np.sort(chosen)


def _normalise(images: np.ndarray) -> np.ndarray:
    out = images.astype(np.float32)
    out /= 255.0
    return out


def main(
    raw_dir: str,
    out: str,
    manifest: str,
    val_fraction: float = 0.1,
    seed: int = 0,
    subset_train: int | None = None,
    subset_val: int | None = None,
    subset_test: int | None = None,
) -> dict:
    start = time.perf_counter()
    raw = Path(raw_dir)
    for name in cifar.MD5:
        if not (raw / name).is_file():
            raise FileNotFoundError(f"missing CIFAR-10 file {raw / name}: run the download rule first")
    if not 0 < val_fraction < 1:
        raise JobError(f"val_fraction must be in (0, 1), got {val_fraction}")
    class_names = cifar.read_class_names(raw / cifar.META)
    subsets = {"train": subset_train, "val": subset_val, "test": subset_test}
    splits = split_images(raw, val_fraction, seed, subsets)
    eye = np.eye(cifar.NUM_CLASSES, dtype=np.float32)
    arrays: dict[str, np.ndarray] = {"class_names": np.array(class_names)}
    for split, (x, y) in splits.items():
        arrays[f"x_{split}"] = _normalise(x)
        arrays[f"y_{split}"] = eye[y]
        arrays[f"labels_{split}"] = y.astype(np.int64)

    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)  # uncompressed: writing and loading stay fast

    info = {
        "file": Path(out).name,
        "md5": md5sum(out),
        "raw_md5": dict(cifar.MD5),
        "val_fraction": val_fraction,
        "split_seed": seed,
        "subset": subsets,
        "class_names": class_names,
        "counts": {split: int(len(y)) for split, (_, y) in splits.items()},
        "class_counts": {
            split: np.bincount(y, minlength=cifar.NUM_CLASSES).tolist() for split, (_, y) in splits.items()
        },
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(manifest, info)
    log.info("wrote %s: %s (%.1f s)", out, json.dumps(info["counts"]), info["seconds"])
    return info


def split_images(raw: Path, val_fraction: float, seed: int, subsets: dict) -> dict:
    """The raw images and labels of each split (uint8, int): a stratified validation split of the
    training batches, then each split's stratified subset where ``subsets`` asks for one."""
    parts = [cifar.read_batch(raw / name) for name in cifar.TRAIN_BATCHES]
    images = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    test_images, test_labels = cifar.read_batch(raw / cifar.TEST_BATCH)
    log.info("read %d training and %d test images", len(images), len(test_images))

    train_idx, val_idx = train_test_split(
        np.arange(len(labels)), test_size=val_fraction, stratify=labels, random_state=seed
    )
    train_idx = train_idx[_stratified_subset(labels[train_idx], subsets["train"], seed, "train")]
    val_idx = val_idx[_stratified_subset(labels[val_idx], subsets["val"], seed, "val")]
    test_idx = _stratified_subset(test_labels, subsets["test"], seed, "test")
    return {
        "train": (images[train_idx], labels[train_idx]),
        "val": (images[val_idx], labels[val_idx]),
        "test": (test_images[test_idx], test_labels[test_idx]),
    }


HELP = {
    "raw_dir": "directory with the verified CIFAR-10 batch files",
    "out": "output .npz",
    "manifest": "output JSON manifest (counts, md5s, split settings)",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
