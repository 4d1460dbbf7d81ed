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
    """Sustained FLOP/s of chained ``size``-square ``keras.ops.matmul``s in ``dtype`` (2 n^3 FLOPs
    each), on whichever backend and device Keras runs in this process."""
    import keras
    from keras import ops

    a = ops.cast(keras.random.normal((size, size), seed=1) / size**0.5, dtype)  # scaled: values stay finite

    def chain(steps: int) -> float:
        x = a
        for _ in range(steps):
            x = ops.matmul(x, a)
        return float(ops.convert_to_numpy(ops.cast(x[0, 0], "float32")))  # waits for the device

    chain(2)  # warm-up
    steps, start = 2, time.perf_counter()
    while True:
        begin = time.perf_counter()
        chain(steps)
        elapsed = time.perf_counter() - begin
        if time.perf_counter() - start > seconds or elapsed > seconds / 3:
            return 2 * size**3 * steps / elapsed
        steps *= 2
