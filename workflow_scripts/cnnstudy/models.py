"""One generic Keras (functional API) builder for every model entry of config.yaml.

An entry's ``layers`` list maps one to one onto ``keras.layers`` classes; ``augmentation``
adds Keras preprocessing layers (active only in training) in front; a ``backbone`` inserts a
``keras.applications`` model. The Dense(num_classes, softmax) output is always added here, in
float32 so that mixed precision never computes the softmax in 16 bits.
"""

from __future__ import annotations

from typing import Any, Iterable

import keras

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


def _layer(item: dict, spec: dict, index: int) -> keras.layers.Layer:
    (class_name, kwargs), = item.items()
    kwargs = dict(kwargs or {})
    if class_name == "Dropout":
        kwargs.setdefault("rate", spec.get("dropout", 0.5))
    cls = getattr(keras.layers, class_name)
    try:
        return cls(**kwargs, name=f"{class_name.lower()}_{index}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"model {spec.get('name')}: layer {index} {class_name}({kwargs}): {exc}") from exc


def build_model(spec: dict, num_classes: int = 10, input_shape: tuple[int, ...] = INPUT_SHAPE) -> keras.Model:
    """Build the (uncompiled) model that ``spec`` describes."""
    inputs = keras.Input(shape=input_shape, name="image")
    x = inputs
    for i, item in enumerate(spec.get("augmentation") or []):
        x = _layer(item, spec, i)(x)
    for i, item in enumerate(flatten_layers(spec["layers"])):
        x = _layer(item, spec, i)(x)
    outputs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32", name="predictions")(x)
    return keras.Model(inputs, outputs, name=spec.get("name", "model"))


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

