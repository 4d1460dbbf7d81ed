"""The entry's optimizer and learning-rate schedule."""

from __future__ import annotations

import keras

from .errors import ConfigError

OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
}
# Optimizer settings that only some optimizers accept.
ONLY_FOR = {"momentum": ("sgd", "rmsprop"), "nesterov": ("sgd",)}


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


def make_optimizer(spec: dict, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """The entry's optimizer, with its learning-rate schedule if it has one."""
    settings = dict(spec["optimizer"])
    name = settings.pop("name")
    for key, allowed in ONLY_FOR.items():
        if key in settings and name not in allowed:
            raise ConfigError(f"model {spec['name']}: optimizer {name} takes no {key!r} (only {', '.join(allowed)})")
    learning_rate = settings.pop("learning_rate")
    schedule = spec["schedule"]
    if schedule:
        total = max(1, spec["epochs"] * steps_per_epoch)
        warmup = min(total - 1, int(round(schedule["warmup_epochs"] * steps_per_epoch)))
        start, end = schedule["warmup_start"], schedule["alpha"]
        if schedule["name"] == "linear":
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
