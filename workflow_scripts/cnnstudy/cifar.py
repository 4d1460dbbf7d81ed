"""CIFAR-10 (python version) facts and readers."""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from .errors import JobError

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


class UnsafePickleError(JobError):
    """A batch file asks to build something a CIFAR-10 file never holds."""


class _DataOnlyUnpickler(pickle.Unpickler):
    """Unpickles plain data only: dicts, lists, bytes, strings, numbers and NumPy arrays.

    The official files hold a dict of bytes keys, lists of ints, a label string and a
    uint8 array. Any other global (os.system, builtins.eval, ...) is refused before it can
    be called, so a replaced file on a shared filesystem cannot run code at preprocessing.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def __init__(self, fh, path):
        super().__init__(fh, encoding="bytes")
        self.path = path

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"{self.path}: refused to unpickle {module}.{name}: a CIFAR-10 batch holds only plain "
            "data (dicts, lists, bytes, numbers, arrays). The file is not an official CIFAR-10 file."
        )


def load_pickle(path: str | Path):
    """The data in a CIFAR-10 pickle file, through the data-only unpickler."""
    with open(path, "rb") as fh:
        data = fh.read()
    return _DataOnlyUnpickler(io.BytesIO(data), path).load()


def read_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Images as uint8 NHWC (N, 32, 32, 3) and integer labels of one batch file."""
    batch = load_pickle(path)
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: unexpected batch layout {data.shape} / {labels.shape}")
    # Rows are 3072 bytes: the red plane, then green, then blue, each 32x32 row-major.
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_class_names(path: str | Path) -> list[str]:
    meta = load_pickle(path)
    return [name.decode() for name in meta[b"label_names"]]
