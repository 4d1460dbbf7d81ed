"""Training images/s of model entries through Keras alone, on whichever backend Keras runs.

The training job needs TensorFlow (tf.data, its device setup); the models are plain Keras 3.
So the same entries of config.yaml can be timed wherever Keras runs: a GPU machine that has
JAX or PyTorch but no TensorFlow, say. This is benchmark.py's *ceiling* path without tf.data:
each training phase of the entry (a transfer entry's fine-tuning too), built as the job builds
it (augmentation layers, the precision policy, Keras' own XLA choice), fed distinct in-memory
batches of random images of CIFAR-10's shape; one untimed warm-up epoch (compilation), then
the median of timed epochs. Random images cost the same arithmetic as real ones: no accuracy
comes from here, and backbones keep random weights. The peak beside it is the sustained rate
of large square matrix products through ``keras.ops`` in the same process, same backend.

    KERAS_BACKEND=jax python tools/keras_speed.py --out reports/keras_speed.md \\
        --models model_01 model_10 model_17
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))  # the workflow's cnnstudy package

from cnnstudy import cli
from cnnstudy.errors import ConfigError
from cnnstudy.files import atomic_path

log = logging.getLogger("cnnstudy.keras_speed")
HERE = Path(__file__).resolve().parent


def device_name() -> str:
    """The device Keras' backend computes on, as the backend names it."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.devices()[0].device_kind
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else "CPU"
    return "CPU"


def time_phases(spec: dict, images: int, rounds: int, precision: str, without_augmentation: bool = False) -> list[dict]:
    """Training images/s of each phase of ``spec`` on ``images`` random images (median of ``rounds`` epochs).

    ``without_augmentation`` drops the entry's augmentation layers: the network's own cost, apart from theirs.
    """
    import keras

    from cnnstudy import flops, models, training

    class EpochTimes(keras.callbacks.Callback):
        """Wall-clock seconds of each epoch, the device's work included (the epoch's loss is read back)."""

        def on_train_begin(self, logs=None):
            self.seconds = []

        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])  # waits for the epoch's last step on an asynchronous backend
            self.seconds.append(time.perf_counter() - self.start)

    layers = ", ".join(name for item in spec["augmentation"] for name in item) or "none"
    if without_augmentation:
        spec, layers = {**spec, "augmentation": []}, f"removed ({layers})" if spec["augmentation"] else "none"

    keras.mixed_precision.set_global_policy(precision)  # a model keeps the policy it was built under
    keras.utils.set_random_seed(0)
    batch = spec["batch_size"]
    steps = images // batch
    if steps == 0:
        raise ConfigError(f"{spec['name']}: --images {images} is less than one batch of {batch}")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((steps * batch, *models.INPUT_SHAPE), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[rng.integers(0, 10, len(x))]
    model = models.build_model(spec, train_images=x)
    rows = []
    for index, phase in enumerate(training.phases(spec), start=1):
        if "unfreeze" in phase:
            models.set_backbone_trainable(model, phase["unfreeze"])
        models.compile_model(model, phase, steps_per_epoch=steps, jit_compile="auto")
        # One fit: a first, untimed epoch (tracing and compilation), then ``rounds`` timed ones. One
        # fit, not one per epoch: with ``use_ema`` a fit ends by assigning the averages to the
        # model's variables, and on JAX the next fit then donates one buffer twice and fails.
        times = EpochTimes()
        model.fit(x, y, batch_size=batch, epochs=1 + rounds, shuffle=False, verbose=0, callbacks=[times])
        warm_up, rates = times.seconds[0], [len(x) / seconds for seconds in times.seconds[1:]]
        rows.append(
            {
                "model": spec["name"],
                "phase": index,
                "epochs": phase["epochs"],
                "batch size": batch,
                "augmentation": layers,
                "train img/s": float(np.median(rates)),
                "warm-up s": warm_up,
                "train GFLOP/img": flops.TRAIN_FACTOR * flops.forward_flops(model) / 1e9,
            }
        )
        log.info("%s", json.dumps(rows[-1]))
    return rows


def report(rows: list[dict], peak: float, dtype: str, settings: str, peak_size: int, train_images: int) -> str:
    """The markdown report of the rows measured so far."""
    import pandas as pd

    table = pd.DataFrame(rows)
    table["train TFLOP/s"] = table["train GFLOP/img"] * table["train img/s"] / 1e3
    table[f"of the {dtype} peak"] = table["train TFLOP/s"] * 1e12 / peak
    table["s per epoch"] = train_images / table["train img/s"]
    table["min for its epochs"] = table["s per epoch"] * table["epochs"] / 60
    return "\n".join(
        [
            "# Training speed through Keras alone",
            "",
            settings,
            "",
            (
                f"Training FLOPs per image as in benchmark.md (cnnstudy/flops.py: conv and dense multiply-adds x 2 x 3). "
                f"Peak: chained {peak_size}x{peak_size} `keras.ops.matmul`s in {dtype}, {peak / 1e12:.1f} TFLOP/s, "
                f"measured in the same process before the rows. s per epoch and minutes for its epochs: at this rate, "
                f"for {train_images} training images and the phase's configured epochs (early stopping may end it "
                "sooner). A frozen backbone runs forward only, so the TFLOP/s of a phase that keeps it frozen are "
                "overstated (up to 3x)."
            ),
            "",
            table.to_markdown(
                index=False, floatfmt=("", "", "", "", "", ",.0f", ".1f", ".3f", ".2f", ".1%", ".1f", ".1f")
            ),
            "",
            f"All rows: {table['min for its epochs'].sum():.1f} min of training at these rates.",
            "",
        ]
    )


def main(
    out: str,
    models: list[str],
    config: str = str(HERE.parent / "config.yaml"),
    images: int = 10240,
    rounds: int = 3,
    precision: str = "mixed_bfloat16",
    train_images: int = 45000,
    peak_size: int = 4096,
    without_augmentation: bool = False,
) -> list[dict]:
    """Time ``models``; ``out`` is rewritten (atomically) after every entry, so a run cut short keeps its rows."""
    import keras
    import yaml

    from cnnstudy import configuration

    with open(config) as fh:
        entries = configuration.load(yaml.safe_load(fh))
    unknown = [name for name in models if name not in entries]
    if unknown:
        raise ConfigError(f"unknown model(s) {', '.join(unknown)}; {config} has {', '.join(entries)}")
    dtype = "float32" if precision == "float32" else precision.removeprefix("mixed_")
    from cnnstudy import flops

    peak = flops.matmul_peak(dtype, peak_size)
    settings = (
        f"Generated by `tools/keras_speed.py` on {time.strftime('%Y-%m-%d %H:%M')}: {device_name()}, "
        f"Keras {keras.__version__} on its {keras.backend.backend()} backend, {precision}, XLA as Keras' 'auto' "
        f"picks. Each phase of each entry: an untimed warm-up epoch, then the median of {rounds} epochs of "
        f"{images} random images (whole batches) fed from memory in order; backbones keep random weights. Not "
        "the workflow's own path (no tf.data pipeline, no callbacks), and no accuracy: the arithmetic the entries cost "
        "here." + (" Augmentation layers removed: the networks alone." if without_augmentation else "")
    )
    rows = []
    for name in models:
        rows += time_phases(entries[name], images, rounds, precision, without_augmentation)
        with atomic_path(out) as tmp:
            Path(tmp).write_text(report(rows, peak, dtype, settings, peak_size, train_images))
    log.info("wrote %s\n%s", out, Path(out).read_text())
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="markdown file to write")
    p.add_argument("--models", nargs="+", required=True, help="model entries of the config to time")
    p.add_argument("--config", default=str(HERE.parent / "config.yaml"))
    p.add_argument("--images", type=int, default=10240, help="random training images per timed epoch")
    p.add_argument("--rounds", type=int, default=3, help="timed epochs per phase (the median is reported)")
    p.add_argument("--precision", default="mixed_bfloat16", choices=["float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--train-images", type=int, default=45000, help="training images per epoch in a real run")
    p.add_argument("--peak-size", type=int, default=4096, help="side of the square matrices of the peak")
    p.add_argument(
        "--without-augmentation", action="store_true", help="time the networks without their augmentation layers"
    )
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
