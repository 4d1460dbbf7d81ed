"""One generic Keras (functional API) builder for every model entry of config.yaml.

An entry's ``layers`` list maps one to one onto ``keras.layers`` classes (or the few in
cnnstudy.layers); ``augmentation`` adds Keras preprocessing layers (active only in training)
in front; a ``backbone`` inserts a ``keras.applications`` model. The Dense(num_classes,
softmax) output is always added here, in float32 so that mixed precision never computes the
softmax in 16 bits; an entry's ``output`` may drop its bias and scale its logits (airbench's
head). Entries come resolved (cnnstudy.configuration): every default is already filled.
"""

from __future__ import annotations

import keras
import numpy as np

from .configuration import flat_layers
from .errors import ConfigError
from .layers import (
    COMPILED_ON_JAX,
    CUSTOM_INITIALIZERS,
    CUSTOM_LAYERS,
    BackbonePreprocess,
    PatchWhitening,
    backbone_constructor,
)
from .optimizers import make_optimizer

INPUT_SHAPE = (32, 32, 3)


def _layer(item: dict, spec: dict, index: int) -> keras.layers.Layer:
    ((class_name, kwargs),) = item.items()
    kwargs = dict(kwargs or {})
    if class_name == "Dropout":
        kwargs.setdefault("rate", spec["dropout"])
    if class_name == "BatchNormalization" and spec["batchnorm_momentum"] is not None:
        kwargs.setdefault("momentum", spec["batchnorm_momentum"])
    if kwargs.get("kernel_initializer") in CUSTOM_INITIALIZERS:
        kwargs["kernel_initializer"] = CUSTOM_INITIALIZERS[kwargs["kernel_initializer"]]()
    cls = CUSTOM_LAYERS.get(class_name) or layer_class(class_name)
    try:
        return cls(**kwargs, name=f"{class_name.lower()}_{index}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec['name']}: layer {index} {class_name}({kwargs}): {exc}") from exc


def layer_class(name: str):
    """Keras' layer class ``name``; on JAX, its XLA-compiled subclass where layers.COMPILED_ON_JAX has one."""
    if keras.backend.backend() == "jax" and name in COMPILED_ON_JAX:
        return COMPILED_ON_JAX[name]
    return getattr(keras.layers, name)


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
    name, size = settings["name"], settings["input_size"]
    ctor = backbone_constructor(name)
    if x.shape[1] != size or x.shape[2] != size:
        x = keras.layers.Resizing(size, size, name="resize")(x)
    x = BackbonePreprocess(name, dtype="float32", name="backbone_preprocess")(x)
    try:
        base = ctor(include_top=False, weights=None, input_shape=(size, size, 3), name="backbone")
    except ValueError as exc:
        raise ConfigError(f"model {spec['name']}: backbone {name} at {size}x{size}: {exc}") from exc
    if weights_path is not None:
        try:
            base.load_weights(weights_path)
        except Exception as exc:  # h5py, shape and format errors all mean the same to a user
            raise ConfigError(
                f"model {spec['name']}: cannot load {name} weights from {weights_path} ({type(exc).__name__}: {exc}). "
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
    for i, item in enumerate(spec["augmentation"]):
        x = _layer(item, spec, i)(x)
    if spec.get("backbone"):
        _, x = _add_backbone(x, spec, weights_path)
    for i, item in enumerate(flat_layers(spec["layers"])):
        x = _layer(item, spec, i)(x)
    scale, stddev = spec["output"]["logit_scale"], spec["output"]["kernel_stddev"]
    outputs = keras.layers.Dense(
        num_classes,
        use_bias=spec["output"]["use_bias"],
        **({"kernel_initializer": keras.initializers.RandomNormal(stddev=stddev)} if stddev else {}),
        activation=None if scale else "softmax",
        dtype="float32",
        name="logits" if scale else "predictions",
    )(x)
    if scale:
        outputs = keras.layers.Rescaling(scale, dtype="float32", name="logit_scale")(outputs)
        outputs = keras.layers.Activation("softmax", dtype="float32", name="predictions")(outputs)
    model = keras.Model(inputs, outputs, name=spec["name"])
    for layer in model.layers:
        if isinstance(layer, PatchWhitening) and train_images is not None:
            layer.adapt(train_images)
    if spec.get("backbone"):
        set_backbone_trainable(model, spec["backbone"]["trainable"])
    return model


def compile_model(
    model: keras.Model, spec: dict, steps_per_epoch: int, jit_compile: bool | str = "auto"
) -> keras.Model:
    annealed = {
        layer.bias.path: layer.bias_epochs * steps_per_epoch
        for layer in model.layers
        if isinstance(layer, PatchWhitening) and layer.bias_anneal
    }
    model.compile(
        optimizer=make_optimizer(spec, steps_per_epoch, annealed),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=spec["label_smoothing"]),
        # cross_entropy: the loss without label smoothing, comparable across entries and with
        # the test set's log loss (the optimised `loss` includes the smoothing).
        metrics=["accuracy", keras.metrics.CategoricalCrossentropy(name="cross_entropy")],
        jit_compile=jit_compile,
    )
    return model
