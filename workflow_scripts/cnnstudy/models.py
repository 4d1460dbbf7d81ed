"""One generic Keras (functional API) builder for every model entry of config.yaml.

An entry's ``layers`` list maps one to one onto ``keras.layers`` classes; ``augmentation``
adds Keras preprocessing layers (active only in training) in front; a ``backbone`` inserts a
``keras.applications`` model. The Dense(num_classes, softmax) output is always added here, in
float32 so that mixed precision never computes the softmax in 16 bits; an entry's ``output``
may drop its bias and scale its logits (airbench's head).

The few pieces Keras lacks for the airbench-style rung are here as registered (saveable)
Keras objects: PatchWhitening, Bias (a bias with its own learning-rate multiplier), the
Dirac conv initialiser and the WarmupLinearDecay ("triangle") schedule.
"""

from __future__ import annotations

from typing import Any, Iterable

import math

import keras
import numpy as np

from .configuration import ConfigError

INPUT_SHAPE = (32, 32, 3)

OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
}
# Optimizer settings that only some optimizers accept.
ONLY_FOR = {"momentum": ("sgd", "rmsprop"), "nesterov": ("sgd",)}


def flatten_layers(items: Iterable[Any]) -> list[dict]:
    """Layer items with blocks (nested lists) expanded, in order."""
    flat: list[dict] = []
    for item in items:
        flat.extend(flatten_layers(item) if isinstance(item, list) else [item])
    return flat


@keras.saving.register_keras_serializable(package="cnnstudy")
class PatchWhitening(keras.layers.Layer):
    """airbench's first layer: a frozen 'valid' convolution that whitens image patches.

    Its 2 * k * k * channels filters are the eigenvectors of the training images' k x k patch
    covariance, scaled by 1 / sqrt(eigenvalue + epsilon), and their negatives (so that a
    following ReLU/GELU keeps both signs). ``adapt(images)`` computes them from the data,
    as a Keras Normalization layer adapts. The bias starts at minus the filters' response to
    the mean patch, so the outputs start centred (airbench normalises its inputs first); it
    stays trainable.
    """

    def __init__(self, kernel_size: int = 2, epsilon: float = 5e-4, samples: int = 5000, **kwargs):
        super().__init__(**kwargs)
        self.kernel_size, self.epsilon, self.samples = int(kernel_size), float(epsilon), int(samples)
        self.adapted = False

    def build(self, input_shape):
        k, channels = self.kernel_size, input_shape[-1]
        self.kernel = self.add_weight(
            shape=(k, k, channels, 2 * k * k * channels), initializer="zeros", trainable=False, name="kernel"
        )
        self.bias = self.add_weight(shape=(2 * k * k * channels,), initializer="zeros", name="bias")

    def adapt(self, images: np.ndarray) -> None:
        """Set the filters from (up to ``samples``) training images, NHWC in [0, 1]."""
        k = self.kernel_size
        images = np.asarray(images[: self.samples], dtype=np.float64)
        patches = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))  # N,H',W',C,k,k
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * images.shape[-1])  # (kh, kw, c) order
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
        filters = eigenvectors / np.sqrt(eigenvalues + self.epsilon)  # one filter per column
        filters = np.concatenate([filters, -filters], axis=1)
        self.kernel.assign(filters.reshape(self.kernel.shape).astype("float32"))
        self.bias.assign((-patches.mean(axis=0) @ filters).astype("float32"))
        self.adapted = True

    def call(self, images):
        kernel = keras.ops.cast(self.kernel, images.dtype)
        return keras.ops.conv(images, kernel, padding="valid") + keras.ops.cast(self.bias, images.dtype)

    def compute_output_shape(self, input_shape):
        k = self.kernel_size
        return (input_shape[0], input_shape[1] - k + 1, input_shape[2] - k + 1, 2 * k * k * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "epsilon": self.epsilon, "samples": self.samples}


@keras.saving.register_keras_serializable(package="cnnstudy")
class Bias(keras.layers.Layer):
    """Adds a per-channel bias that learns ``lr_multiplier`` times faster than the other weights.

    Keras optimizers have one learning rate for all variables; airbench trains BatchNorm
    biases 64x faster. The variable holds bias / sqrt(m) and the layer adds it times
    sqrt(m): gradient and step both scale by sqrt(m), so the bias moves m times as far
    under (momentum) SGD, while decoupled weight decay shrinks it at the usual rate.
    Use it after BatchNormalization(center=False).
    """

    def __init__(self, lr_multiplier: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.lr_multiplier = float(lr_multiplier)

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.bias * math.sqrt(self.lr_multiplier), inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "lr_multiplier": self.lr_multiplier}


@keras.saving.register_keras_serializable(package="cnnstudy")
class Dirac(keras.initializers.RandomUniform):
    """airbench's conv initialisation: PyTorch's default uniform(+-1/sqrt(fan_in)) kernel whose
    first min(in, out) filters are the identity (filter i passes input channel i through),
    so each conv starts as an implicit residual connection.
    """

    def __init__(self, seed=None):
        super().__init__(minval=-1.0, maxval=1.0, seed=seed)

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        kernel = super().__call__(shape, dtype) / math.sqrt(kh * kw * cin)
        n = min(cin, cout)
        identity, keep = np.zeros(shape, "float32"), np.ones(shape, "float32")
        identity[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        keep[..., :n] = 0.0
        return kernel * keras.ops.cast(keep, kernel.dtype) + keras.ops.cast(identity, kernel.dtype)

    def get_config(self):
        return {"seed": super().get_config()["seed"]}


CUSTOM_LAYERS = {"PatchWhitening": PatchWhitening, "Bias": Bias}
CUSTOM_INITIALIZERS = {"dirac": Dirac}


@keras.saving.register_keras_serializable(package="cnnstudy")
class WarmupLinearDecay(keras.optimizers.schedules.LearningRateSchedule):
    """airbench's "triangle": linear from ``start`` x ``peak`` up to ``peak`` over
    ``warmup_steps``, then linear down to ``end`` x ``peak`` at ``total_steps``."""

    def __init__(self, peak: float, warmup_steps: int, total_steps: int, start: float = 0.0, end: float = 0.0):
        self.peak, self.warmup_steps, self.total_steps = float(peak), int(warmup_steps), int(total_steps)
        self.start, self.end = float(start), float(end)

    def __call__(self, step):
        step = keras.ops.cast(step, "float32")
        up = self.start + (1.0 - self.start) * step / max(self.warmup_steps, 1)
        down = 1.0 + (self.end - 1.0) * (step - self.warmup_steps) / max(self.total_steps - self.warmup_steps, 1)
        return self.peak * keras.ops.where(step < self.warmup_steps, up, keras.ops.maximum(down, self.end))

    def get_config(self):
        return {"peak": self.peak, "warmup_steps": self.warmup_steps, "total_steps": self.total_steps,
                "start": self.start, "end": self.end}  # fmt: skip


def _layer(item: dict, spec: dict, index: int) -> keras.layers.Layer:
    (class_name, kwargs), = item.items()
    kwargs = dict(kwargs or {})
    if class_name == "Dropout":
        kwargs.setdefault("rate", spec.get("dropout", 0.5))
    if class_name == "BatchNormalization" and spec.get("batchnorm_momentum") is not None:
        kwargs.setdefault("momentum", spec["batchnorm_momentum"])
    if kwargs.get("kernel_initializer") in CUSTOM_INITIALIZERS:
        kwargs["kernel_initializer"] = CUSTOM_INITIALIZERS[kwargs["kernel_initializer"]]()
    cls = CUSTOM_LAYERS.get(class_name) or getattr(keras.layers, class_name)
    try:
        return cls(**kwargs, name=f"{class_name.lower()}_{index}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec.get('name')}: layer {index} {class_name}({kwargs}): {exc}") from exc


def backbone_constructor(name: str):
    ctor = getattr(keras.applications, name, None)
    if not callable(ctor) or not ctor.__module__.startswith("keras.src.applications."):
        raise ConfigError(f"backbone {name!r} is not a keras.applications model (e.g. VGG16, ResNet50, InceptionV3)")
    return ctor


def preprocess_function(name: str):
    """The backbone's own ``preprocess_input`` (from its keras.applications module)."""
    module = backbone_constructor(name).__module__.rsplit(".", 1)[-1]
    return getattr(keras.applications, module).preprocess_input


@keras.saving.register_keras_serializable(package="cnnstudy")
class BackbonePreprocess(keras.layers.Layer):
    """Scales our [0, 1] images the way ``backbone`` was trained (its preprocess_input on 0-255).

    Runs in float32 (set by the builder) so the mean subtraction is exact under mixed precision.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._preprocess = preprocess_function(backbone)

    def call(self, images):
        return self._preprocess(images * 255.0)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


def set_backbone_trainable(model: keras.Model, trainable: str | int) -> None:
    """frozen: only the head trains; all: everything; N: the backbone's last N layers too."""
    base = model.get_layer("backbone")
    count = {"frozen": 0, "all": len(base.layers)}.get(trainable, trainable)
    base.trainable = count > 0
    # Set every layer: Keras cascades `trainable` only when the parent's flag changes.
    for index, layer in enumerate(base.layers):
        layer.trainable = index >= len(base.layers) - count


def _add_backbone(x, spec: dict, weights_path: str | None):
    settings = spec["backbone"]
    name, size = settings["name"], settings.get("input_size", INPUT_SHAPE[0])
    ctor = backbone_constructor(name)
    if x.shape[1] != size or x.shape[2] != size:
        x = keras.layers.Resizing(size, size, name="resize")(x)
    x = BackbonePreprocess(name, dtype="float32", name="backbone_preprocess")(x)
    try:
        base = ctor(include_top=False, weights=None, input_shape=(size, size, 3), name="backbone")
    except ValueError as exc:
        raise ConfigError(f"model {spec.get('name')}: backbone {name} at {size}x{size}: {exc}") from exc
    if weights_path is not None:
        try:
            base.load_weights(weights_path)
        except Exception as exc:  # h5py, shape and format errors all mean the same to a user
            raise ConfigError(
                f"model {spec.get('name')}: cannot load {name} weights from {weights_path} ({type(exc).__name__}: {exc}). "
                "Fix the path, or fetch Keras' ImageNet file with `snakemake weights`."
            ) from exc
    # Frozen or not, the backbone runs in inference mode so that fine-tuning never
    # destroys its BatchNormalization statistics (Keras transfer-learning guide).
    return base, base(x, training=False)


def build_model(
    spec: dict,
    num_classes: int = 10,
    input_shape: tuple[int, ...] = INPUT_SHAPE,
    weights_path: str | None = None,
    train_images: np.ndarray | None = None,
) -> keras.Model:
    """Build the (uncompiled) model that ``spec`` describes.

    ``weights_path`` is the backbone's weights file, for entries with a backbone whose
    weights are not ``none`` (the caller resolves ``imagenet`` to the fetched file).
    ``train_images`` initialise data-dependent layers (PatchWhitening); without them those
    layers keep zero filters, which is only right when weights are loaded afterwards.
    """
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, item in enumerate(spec.get("augmentation") or []):
        x = _layer(item, spec, i)(x)
    if spec.get("backbone"):
        _, x = _add_backbone(x, spec, weights_path)
    for i, item in enumerate(flatten_layers(spec["layers"])):
        x = _layer(item, spec, i)(x)
    head = spec.get("output") or {}
    scale = head.get("logit_scale")
    outputs = keras.layers.Dense(
        num_classes,
        use_bias=head.get("use_bias", True),
        activation=None if scale else "softmax",
        dtype="float32",
        name="logits" if scale else "predictions",
    )(x)
    if scale:
        outputs = keras.layers.Rescaling(scale, dtype="float32", name="logit_scale")(outputs)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(outputs)
    model = keras.Model(inputs, outputs, name=spec.get("name", "model"))
    for layer in model.layers:
        if isinstance(layer, PatchWhitening) and train_images is not None:
            layer.adapt(train_images)
    if spec.get("backbone"):
        set_backbone_trainable(model, spec["backbone"].get("trainable", "frozen"))
    return model


def make_optimizer(spec: dict, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The entry's optimizer, with its learning-rate schedule if it has one."""
    settings = dict(spec["optimizer"])
    name = settings.pop("name")
    for key, allowed in ONLY_FOR.items():
        if key in settings and name not in allowed:
            raise ConfigError(f"model {spec.get('name')}: optimizer {name} takes no {key!r} (only {', '.join(allowed)})")
    learning_rate = settings.pop("learning_rate")
    schedule = spec.get("schedule")
    if schedule:
        total = max(1, spec["epochs"] * steps_per_epoch)
        warmup = min(total - 1, int(round(schedule.get("warmup_epochs", 0) * steps_per_epoch)))
        start, end = schedule.get("warmup_start", 0.0), schedule.get("alpha", 0.0)
        if schedule.get("name", "cosine") == "linear":
            learning_rate = WarmupLinearDecay(learning_rate, warmup, total, start, end)
        else:
            learning_rate = keras.optimizers.schedules.CosineDecay(
                initial_learning_rate=learning_rate if warmup == 0 else start * learning_rate,
                warmup_target=learning_rate if warmup else None,
                warmup_steps=warmup,
                decay_steps=total - warmup,
                alpha=end,
            )
    return OPTIMIZERS[name](learning_rate=learning_rate, **settings)


def compile_model(model: keras.Model, spec: dict, steps_per_epoch: int, jit_compile: bool | str = "auto") -> keras.Model:
    model.compile(
        optimizer=make_optimizer(spec, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.get("label_smoothing", 0.0)),
        # cross_entropy: the loss without label smoothing, comparable across entries and with
        # the test set's log loss (the optimised `loss` includes the smoothing).
        metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="cross_entropy")],
        jit_compile=jit_compile,
    )
    return model

