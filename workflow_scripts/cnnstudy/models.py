"""One generic Keras (functional API) builder for every model entry of config.yaml.

An entry's ``layers`` list maps one to one onto ``keras.layers`` classes; ``augmentation``
adds Keras preprocessing layers (active only in training) in front; a ``backbone`` inserts a
``keras.applications`` model. The Dense(num_classes, softmax) output is always added here, in
float32 so that mixed precision never computes the softmax in 16 bits.
"""

from __future__ import annotations

from typing import Any, Iterable

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
    as a Keras Normalization layer adapts; the bias stays trainable.
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
        kernel = np.concatenate([filters, -filters], axis=1).reshape(self.kernel.shape)
        self.kernel.assign(kernel.astype("float32"))
        self.adapted = True

    def call(self, images):
        kernel = keras.ops.cast(self.kernel, images.dtype)
        return keras.ops.conv(images, kernel, padding="valid") + keras.ops.cast(self.bias, images.dtype)

    def compute_output_shape(self, input_shape):
        k = self.kernel_size
        return (input_shape[0], input_shape[1] - k + 1, input_shape[2] - k + 1, 2 * k * k * input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "kernel_size": self.kernel_size, "epsilon": self.epsilon, "samples": self.samples}


CUSTOM_LAYERS = {"PatchWhitening": PatchWhitening}


def _layer(item: dict, spec: dict, index: int) -> keras.layers.Layer:
    (class_name, kwargs), = item.items()
    kwargs = dict(kwargs or {})
    if class_name == "Dropout":
        kwargs.setdefault("rate", spec.get("dropout", 0.5))
    if class_name == "BatchNormalization" and spec.get("batchnorm_momentum") is not None:
        kwargs.setdefault("momentum", spec["batchnorm_momentum"])
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
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
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
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=learning_rate if warmup == 0 else 0.0,
            warmup_target=learning_rate if warmup else None,
            warmup_steps=warmup,
            decay_steps=total - warmup,
            alpha=schedule.get("alpha", 0.0),
        )
    return OPTIMIZERS[name](learning_rate=learning_rate, **settings)


def compile_model(model: keras.Model, spec: dict, steps_per_epoch: int, jit_compile: bool | str = "auto") -> keras.Model:
    model.compile(
        optimizer=make_optimizer(spec, steps_per_epoch),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec.get("label_smoothing", 0.0)),
        metrics=["accuracy"],
        jit_compile=jit_compile,
    )
    return model

