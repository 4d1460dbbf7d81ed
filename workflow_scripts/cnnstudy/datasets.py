"""Input pipelines over the in-memory npz arrays: tf.data for TensorFlow jobs, a Keras PyDataset
for JAX jobs (no TensorFlow import). Both give the same batches: each epoch in ``epoch_order``,
the same flips."""

from __future__ import annotations

import numpy as np


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order in which epoch ``epoch`` (0-based) of run ``seed`` visits the n training images.

    A function of (seed, epoch) alone, never of how many epochs this process has run, so
    a job resumed at epoch k sees exactly the batches an uninterrupted run sees (NumPy's
    PCG64 streams are stable across NumPy versions).
    """
    return np.random.default_rng([seed, epoch]).permutation(n).astype(np.int32)


def flip_mask(seed: int, n: int) -> np.ndarray:
    """Which training images run ``seed`` mirrors in its even epochs (airbench's alternating
    flip: a random half in epoch 0, then every image the other way round in every next epoch)."""
    return np.random.default_rng([seed, FLIP_STREAM]).random(n) < 0.5


FLIP_STREAM = 0xF11F  # keeps the flip draws apart from epoch_order's (seed, epoch) streams


def train_dataset(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    epochs: int = 1,
    drop_last: bool = False,
    alternating_flip: bool = False,
):
    """Batches of epochs ``first_epoch`` .. ``epochs - 1``, each in its ``epoch_order``, prefetched.

    One dataset for the whole ``fit`` (used with ``steps_per_epoch``): an epoch's last,
    smaller batch never mixes with the next epoch's images; ``drop_last`` leaves it out, as
    airbench's loader does. ``alternating_flip`` mirrors the images of ``flip_mask`` in even
    epochs and the others in odd epochs. A fit of no epochs (a resumed job whose training had
    already ended) still gets one epoch's batches, which it never reads.
    """
    import tensorflow as tf

    n = len(x) - len(x) % batch_size if drop_last else len(x)
    epoch_numbers = range(first_epoch, max(epochs, first_epoch + 1))
    orders = np.stack([epoch_order(seed, epoch, len(x))[:n] for epoch in epoch_numbers])
    images, labels = tf.constant(x), tf.constant(y)
    if not alternating_flip:
        ds = tf.data.Dataset.from_tensor_slices(orders)
        ds = ds.flat_map(lambda order: tf.data.Dataset.from_tensor_slices(order).batch(batch_size))
        ds = ds.map(lambda index: (tf.gather(images, index), tf.gather(labels, index)))
        return ds.prefetch(tf.data.AUTOTUNE)
    mask = flip_mask(seed, len(x))
    flips = np.stack([mask[order] ^ bool(epoch % 2) for order, epoch in zip(orders, epoch_numbers, strict=True)])
    ds = tf.data.Dataset.from_tensor_slices((orders, flips))
    ds = ds.flat_map(lambda order, flip: tf.data.Dataset.from_tensor_slices((order, flip)).batch(batch_size))

    def gather(index, flip):
        batch = tf.gather(images, index)
        return tf.where(flip[:, None, None, None], tf.reverse(batch, axis=[2]), batch), tf.gather(labels, index)

    return ds.map(gather).prefetch(tf.data.AUTOTUNE)


def epoch_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    drop_last: bool = False,
    alternating_flip: bool = False,
):
    """train_dataset's batches as a keras.utils.PyDataset of NumPy arrays, for backends other
    than TensorFlow: batch i of the current epoch, which starts at ``first_epoch`` and moves on at
    every epoch's end (Keras calls on_epoch_end), so a resumed fit sees the epochs it resumes."""
    import keras

    class EpochBatches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__(workers=1, use_multiprocessing=False)
            self.n = len(x) - len(x) % batch_size if drop_last else len(x)
            self.mask = flip_mask(seed, len(x)) if alternating_flip else None
            self.epoch = first_epoch - 1
            self.on_epoch_end()

        def on_epoch_end(self):
            self.epoch += 1
            self.order = epoch_order(seed, self.epoch, len(x))[: self.n]

        def __len__(self):
            return -(-self.n // batch_size)

        def __getitem__(self, i):
            index = self.order[i * batch_size : (i + 1) * batch_size]
            images = x[index]
            if self.mask is not None:
                flip = self.mask[index] ^ bool(self.epoch % 2)
                images = np.where(flip[:, None, None, None], images[:, :, ::-1], images)
            return images, y[index]

    return EpochBatches()


def training_batches(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    seed: int,
    first_epoch: int = 0,
    epochs: int = 1,
    drop_last: bool = False,
    alternating_flip: bool = False,
):
    """A training fit's batches on the backend Keras runs: train_dataset (tf.data) on TensorFlow,
    epoch_batches (NumPy, no TensorFlow import) elsewhere; the same batches either way."""
    import keras

    if keras.backend.backend() == "tensorflow":
        return train_dataset(x, y, batch_size, seed, first_epoch, epochs, drop_last, alternating_flip)
    return epoch_batches(x, y, batch_size, seed, first_epoch, drop_last, alternating_flip)


def images_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n - n % batch_size if drop_last else n


def steps_per_epoch(n: int, batch_size: int, drop_last: bool = False) -> int:
    return n // batch_size if drop_last else -(-n // batch_size)


def eval_dataset(x: np.ndarray, y: np.ndarray | None, batch_size: int):
    """In order, batched, prefetched (y may be None for prediction)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
