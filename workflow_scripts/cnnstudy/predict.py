"""Predictions of a model as it is evaluated: its weight average (EMA) and test-time augmentation.

One function serves the evaluation job and the per-epoch accuracy recorded during training,
so both measure the same thing.
"""

from __future__ import annotations

import contextlib

import numpy as np

BATCH_SIZE = 500  # prediction batch: the same everywhere, so the same weights give the same numbers
TTA_VIEWS = {"none": 1, "flip": 2, "flip_translate": 6}  # forward passes per image


def _shift(x: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """The images moved by (dy, dx) pixels, |d| <= 1, the border filled by reflection."""
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="reflect")
    height, width = x.shape[1:3]
    return padded[:, 1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]


def predict_views(
    model, x: np.ndarray, tta: str = "none", batch_size: int = BATCH_SIZE
) -> tuple[np.ndarray, np.ndarray]:
    """(class probabilities with TTA, probabilities of the plain images): one pass per view.

    flip: the mean over the image and its mirror image. flip_translate (airbench's level 2):
    half that, plus a quarter each of the same pair for the image moved one pixel down-right
    and one pixel up-left.

    The views' probabilities are averaged, not their logits (airbench averages logits): the
    weighted mean of the views' predictive distributions is itself a distribution, so the log
    loss and the accuracy reported beside it are of one and the same prediction, and every
    model here ends in a softmax.
    """

    def run(images):
        return model.predict(images, batch_size=batch_size, verbose=0).astype(np.float64)

    def with_mirror(images, plain=None):
        return ((run(images) if plain is None else plain) + run(images[:, :, ::-1, :])) / 2

    plain = run(x)
    probs = plain if tta == "none" else with_mirror(x, plain)
    if tta == "flip_translate":
        probs = probs / 2 + (with_mirror(_shift(x, 1, 1)) + with_mirror(_shift(x, -1, -1))) / 4
    # float32 softmax rows, renormalised in float64
    return probs / probs.sum(axis=1, keepdims=True), plain / plain.sum(axis=1, keepdims=True)


def ema_pairs(optimizer) -> list[tuple]:
    """(model variable, its moving average) for an optimizer with ``use_ema``; [] otherwise.

    Keras keeps the averages in private attributes and has no public accessor for them
    (its own keras.callbacks.SwapEMAWeights reads the same two). This is the one place that
    touches them; tests/test_resume.py fails loudly if Keras renames them.
    """
    opt = getattr(optimizer, "inner_optimizer", optimizer)  # LossScaleOptimizer under float16
    if opt is None or not getattr(opt, "use_ema", False):
        return []
    return list(zip(opt._trainable_variables, opt._model_variables_moving_average, strict=True))


@contextlib.contextmanager
def evaluated_weights(model):
    """Inside the block the model holds the weights it is evaluated with (its EMA, if any).

    Unlike SwapEMAWeights' in-place arithmetic swap, the values are copied, so the training
    weights come back bit for bit. Copied as NumPy arrays: on JAX, assigning the average variable
    itself would share its buffer, which predict() then frees with the model's (the EMA lost).
    """
    pairs = ema_pairs(model.optimizer) if getattr(model, "optimizer", None) is not None else []
    saved = [variable.numpy() for variable, _ in pairs]
    for variable, average in pairs:
        variable.assign(average.numpy())
    try:
        yield model
    finally:
        for (variable, _), value in zip(pairs, saved, strict=True):
            variable.assign(value)
