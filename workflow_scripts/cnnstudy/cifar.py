"""CIFAR-10 (python version) facts and readers."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

OFFICIAL_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
ARCHIVE_DIR = "cifar-10-batches-py"

# md5 of every extracted file, from the official archive. Mirrors repack the archive,
# so the archive's own md5 is not checked: these are.
MD5 = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 NHWC (N, 32, 32, 3) and integer labels of one batch file."""
    with open(path, "rb") as fh:
        batch = pickle.load(fh, encoding="bytes")
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: unexpected batch layout {data.shape} / {labels.shape}")
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_class_names(path: str | Path) -> list[str]:
    with open(path, "rb") as fh:
        meta = pickle.load(fh, encoding="bytes")
    return [name.decode() for name in meta[b"label_names"]]
