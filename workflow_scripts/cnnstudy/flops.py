"""Arithmetic a model does per image, counted from its layers, and the machine's matmul peak.

Convention: a multiply-add is 2 FLOPs. Counted: the multiply-adds of convolutions (Conv2D,
DepthwiseConv2D, PatchWhitening) and Dense layers, in backbones too; elementwise work
(BatchNormalization, activations, pooling, augmentation) is not counted, being a few percent
at most. Training a batch costs about 3x the forward pass (the forward pass, the gradient with
respect to the inputs and with respect to the weights), unless measured otherwise.
"""

from __future__ import annotations

import time

TRAIN_FACTOR = 3


def _layers(model):
    for layer in model.layers:
        if hasattr(layer, "layers"):  # a nested model (keras.applications backbone)
            yield from _layers(layer)
        else:
            yield layer


def forward_flops(model) -> int:
    """FLOPs of one image's forward pass (multiply-adds x 2) through ``model``'s conv and dense layers."""
    import keras

    from .layers import PatchWhitening

    total = 0
    for layer in _layers(model):
        if isinstance(layer, (keras.layers.Conv2D, PatchWhitening)):
            kernel = layer.kernel.shape  # (kh, kw, cin / groups, cout)
            _, height, width, _ = layer.output.shape
            total += 2 * kernel[0] * kernel[1] * kernel[2] * kernel[3] * height * width
        elif isinstance(layer, keras.layers.DepthwiseConv2D):
            kh, kw, cin, multiplier = layer.kernel.shape
            _, height, width, _ = layer.output.shape
            total += 2 * kh * kw * cin * multiplier * height * width
        elif isinstance(layer, keras.layers.Dense):
            total += 2 * layer.kernel.shape[0] * layer.kernel.shape[1]
    return int(total)


def matmul_peak(dtype: str, size: int = 2048, seconds: float = 3.0) -> float:
    """Sustained FLOP/s of large square ``tf.linalg.matmul``s in ``dtype`` (2 n^3 FLOPs each)."""
    import tensorflow as tf

    a = tf.random.stateless_normal((size, size), seed=[1, 2], dtype=tf.float32)
    a = tf.cast(a, dtype)

    @tf.function
    def chain(x, steps):
        for _ in tf.range(steps):
            x = tf.linalg.matmul(x, a) * tf.cast(1.0 / size, dtype)  # scaled: values stay finite
        return x

    chain(a, tf.constant(2)).numpy()  # trace and warm up
    steps, start = 2, time.perf_counter()
    while True:
        begin = time.perf_counter()
        chain(a, tf.constant(steps)).numpy()
        elapsed = time.perf_counter() - begin
        if time.perf_counter() - start > seconds or elapsed > seconds / 3:
            return 2 * size**3 * steps / elapsed
        steps *= 2
