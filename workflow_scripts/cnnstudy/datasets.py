"""tf.data input pipelines over the in-memory npz arrays."""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` (0-based) of run ``seed`` visits the n training images.

    A function of (seed, epoch) alone, never of how many epochs this process has run, so
    a job resumed at epoch k sees exactly the batches an uninterrupted run sees (NumPy's
    PCG64 streams are stable across NumPy versions).
    """
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def train_dataset(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, first_epoch: int = 0, epochs: int = 1):
    """Batches of epochs ``first_epoch`` .. ``epochs - 1``, each in its ``epoch_order``, prefetched.

    One dataset for the whole ``fit`` (used with ``steps_per_epoch``): an epoch's last,
    smaller batch never mixes with the next epoch's images. A fit of no epochs (a resumed job
    whose training had already ended) still gets one epoch's batches, which it never reads.
    """
    import tensorflow as tf

    orders = np.stack([epoch_order(seed, epoch, len(x)) for epoch in range(first_epoch, max(epochs, first_epoch + 1))])
    images, labels = tf.constant(x), tf.constant(y)
    ds = tf.data.Dataset.from_tensor_slices(orders)
    ds = ds.flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))
    ds = ds.map(lambda index: (tf.gather(images, index), tf.gather(labels, index)))
    return ds.prefetch(tf.data.AUTOTUNE)


def steps_per_epoch(n: int, batch_size: int) -> int:
    return -(-n // batch_size)


def eval_dataset(x: np.ndarray, y: np.ndarray | None, batch_size: int):
    """In order, batched, prefetched (y may be None for prediction)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
