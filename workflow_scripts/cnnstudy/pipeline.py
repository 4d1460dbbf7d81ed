"""tf.data input pipelines over the in-memory npz arrays."""

from __future__ import annotations

import numpy as np


def train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int):
    """Shuffled (reshuffled every epoch, reproducibly from ``seed``), batched, prefetched."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices((x, y))
    ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def eval_dataset(x: np.ndarray, y: np.ndarray | None, batch_size: int):
    """In order, batched, prefetched (y may be None for prediction)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
