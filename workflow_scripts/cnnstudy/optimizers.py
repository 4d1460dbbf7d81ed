"""The entry's optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import keras
from keras import ops

from .errors import ConfigError


@keras.saving.register_keras_serializable(package="cnnstudy")
class ConvMuon(keras.optimizers.Optimizer):
    """airbench94_muon's optimizers in one Keras optimizer: Muon for the conv kernels, Nesterov
    SGD for everything else.

    Keras' own ``keras.optimizers.Muon`` applies Muon to 2-D variables only and AdamW to the
    rest, conv kernels included. Here a (kh, kw, cin, cout) kernel is the (kh*kw*cin, cout)
    matrix Muon is meant for: its Nesterov momentum (``muon_momentum``) is orthogonalised by
    ``ns_steps`` quintic Newton-Schulz iterations, and, as in airbench, the kernel is first
    rescaled to Frobenius norm sqrt(cout), so its step size is set by ``muon_learning_rate``
    alone. Other variables take PyTorch-style Nesterov SGD (buffer = momentum * buffer + g, step
    g + momentum * buffer) at ``learning_rate``. The Muon rate is ``muon_scale`` x the learning
    rate, so a schedule moves both together. Decoupled weight decay (Keras' ``weight_decay``)
    shrinks every variable; on the normalised kernels it has no effect.

    ``annealed`` maps variables' paths to a number of steps: such a variable (airbench94_muon's
    whitening bias) takes its own rate, linear from ``anneal_peak`` down to 0 over those steps,
    for its step and its weight decay alike, and stays frozen after them.
    """

    NS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's coefficients

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.85,
        nesterov=True,
        muon_scale=1.0,
        muon_momentum=0.6,
        ns_steps=3,
        annealed=None,
        anneal_peak=None,
        name="conv_muon",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.momentum, self.nesterov = float(momentum), bool(nesterov)
        self.muon_scale, self.muon_momentum, self.ns_steps = float(muon_scale), float(muon_momentum), int(ns_steps)
        self.annealed = {str(path): int(steps) for path, steps in (annealed or {}).items()}
        if self.annealed and anneal_peak is None:
            raise ValueError("ConvMuon: annealed variables need anneal_peak, the rate they start from")
        self.anneal_peak = None if anneal_peak is None else float(anneal_peak)

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.buffers = self.add_optimizer_variables(variables, "momentum")
        self._anneal_steps = {
            self._get_variable_index(v): self.annealed[v.path] for v in variables if v.path in self.annealed
        }
        if len(self._anneal_steps) != len(self.annealed):
            missing = sorted(set(self.annealed) - {v.path for v in variables})
            raise ValueError(f"ConvMuon: annealed variables not among the trained ones: {missing}")

    def _rate(self, variable, learning_rate):
        """``learning_rate``, or an annealed variable's own rate at this step (0 once frozen)."""
        steps = self._anneal_steps.get(self._get_variable_index(variable)) if self.annealed else None
        if steps is None:
            return ops.cast(learning_rate, variable.dtype)
        left = ops.maximum(0.0, 1.0 - ops.cast(self.iterations, "float32") / steps)
        return ops.cast(self.anneal_peak * left, variable.dtype)

    # Keras internals, for want of a public hook for a per-variable weight decay:
    # Optimizer._apply_weight_decay, _use_weight_decay and _get_variable_index. The ConvMuon tests
    # in tests/test_speed.py (the annealed bias, its decay and its freeze) fail if they change.
    def _apply_weight_decay(self, variables):
        if not self.annealed or self.weight_decay is None:  # Keras' own, unchanged
            return super()._apply_weight_decay(variables)
        for variable in variables:
            if self._use_weight_decay(variable):
                lr = self._rate(variable, self.learning_rate)
                variable.assign(variable - variable * ops.cast(self.weight_decay, variable.dtype) * lr)

    @classmethod
    def orthogonalise(cls, g, steps: int):
        """Newton-Schulz: ``g`` (rows, cols) -> roughly U V^T of its SVD (singular values ~0.5-1.5)."""
        a, b, c = cls.NS
        x = g / (ops.sqrt(ops.sum(ops.square(g))) + 1e-7)
        tall = g.shape[0] > g.shape[1]
        if tall:
            x = ops.transpose(x)
        for _ in range(steps):
            gram = ops.matmul(x, ops.transpose(x))
            x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
        return ops.transpose(x) if tall else x

    def update_step(self, gradient, variable, learning_rate):
        lr = self._rate(variable, learning_rate)
        g = ops.cast(gradient, variable.dtype)
        buffer = self.buffers[self._get_variable_index(variable)]
        momentum = self.muon_momentum if len(variable.shape) == 4 else self.momentum
        self.assign(buffer, ops.add(ops.multiply(buffer, momentum), g))
        step = ops.add(g, ops.multiply(buffer, momentum)) if self.nesterov else buffer
        if len(variable.shape) == 4:
            cout = variable.shape[-1]
            norm = ops.sqrt(ops.sum(ops.square(variable)))
            self.assign(variable, ops.multiply(variable, math.sqrt(cout) / norm))
            update = self.orthogonalise(ops.reshape(step, (-1, cout)), self.ns_steps)
            self.assign_sub(variable, ops.multiply(ops.reshape(update, variable.shape), lr * self.muon_scale))
        else:
            self.assign_sub(variable, ops.multiply(step, lr))

    def get_config(self):
        return {
            **super().get_config(),
            "momentum": self.momentum,
            "nesterov": self.nesterov,
            "muon_scale": self.muon_scale,
            "muon_momentum": self.muon_momentum,
            "ns_steps": self.ns_steps,
            "annealed": self.annealed,
            "anneal_peak": self.anneal_peak,
        }


OPTIMIZERS = {
    "sgd": keras.optimizers.SGD,
    "adam": keras.optimizers.Adam,
    "adamw": keras.optimizers.AdamW,
    "rmsprop": keras.optimizers.RMSprop,
    "nadam": keras.optimizers.Nadam,
    "conv_muon": ConvMuon,
}
# Optimizer settings that only some optimizers accept.
ONLY_FOR = {
    "momentum": ("sgd", "rmsprop", "conv_muon"),
    "nesterov": ("sgd", "conv_muon"),
    "muon_learning_rate": ("conv_muon",),
    "muon_momentum": ("conv_muon",),
}


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
        return {
            "peak": self.peak,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "start": self.start,
            "end": self.end,
        }


def make_optimizer(spec: dict, steps_per_epoch: int, annealed: dict | None = None) -> keras.optimizers.Optimizer:
    """The entry's optimizer, with its learning-rate schedule if it has one; ``annealed``: variables'
    paths -> steps over which their own rate falls from the peak to 0 (ConvMuon only)."""
    settings = dict(spec["optimizer"])
    name = settings.pop("name")
    for key, allowed in ONLY_FOR.items():
        if key in settings and name not in allowed:
            raise ConfigError(f"model {spec['name']}: optimizer {name} takes no {key!r} (only {', '.join(allowed)})")
    learning_rate = settings.pop("learning_rate")
    if annealed:
        if name != "conv_muon":
            raise ConfigError(f"model {spec['name']}: bias_anneal needs the conv_muon optimizer, not {name}")
        settings.update(annealed=annealed, anneal_peak=learning_rate)
    if "muon_learning_rate" in settings:  # the Muon rate follows the schedule as a fixed multiple
        settings["muon_scale"] = settings.pop("muon_learning_rate") / learning_rate
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
