"""Train one model entry with one seed.

Keras callbacks do the work: EarlyStopping (if the entry asks), TerminateOnNaN (a NaN or
Inf loss fails the job with a clear message), CSVLogger (per-epoch history) and
BackupAndRestore (a rerun of a killed job resumes after its last finished epoch). The
resumable state lives in ``--state-dir``, outside the job's outputs, so Snakemake's cleanup
of incomplete outputs never deletes it; it is removed once the outputs are written, and
discarded if the entry, seed, precision or data changed since it was saved.

Transfer-learning entries may have a second phase (``backbone.fine_tune``: the Keras
guide's recipe): after the first ``epochs`` more of the backbone is unfrozen and training
goes on at a lower rate. Each phase has its own resumable state.

    python workflow_scripts/train.py --data results/data/cifar10.npz --spec results/specs/model_10.json \\
        --model-out model.keras --history-out history.csv --info-out train_info.json \\
        --state-dir results/train_state/model_10/seed_0 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from cnnstudy import cli, configuration, runtime
from cnnstudy.io import atomic_path, read_json, write_json

log = logging.getLogger("cnnstudy.train")


def _fingerprint(spec: dict, seed: int, precision: str, data: Path) -> dict:
    stat = data.stat()
    return {
        "spec_hash": configuration.spec_hash(spec),
        "seed": seed,
        "precision": precision,
        "data": [stat.st_size, stat.st_mtime_ns],
    }


def _prepare_state(state_dir: Path, fingerprint: dict) -> int:
    """Keep a previous run's state only if it belongs to the same job; return its last epoch."""
    marker = state_dir / "fingerprint.json"
    if state_dir.exists() and (not marker.is_file() or read_json(marker) != fingerprint):
        log.info("discarding stale training state in %s (entry, seed, precision or data changed)", state_dir)
        shutil.rmtree(state_dir)
    state_dir.mkdir(parents=True, exist_ok=True)
    write_json(marker, fingerprint)
    epochs = [read_json(m)["epoch"] for m in state_dir.glob("phase*/training_metadata.json")]
    epochs += [read_json(m)["end_epoch"] for m in state_dir.glob("phase*.done.json")]
    return int(max(epochs, default=0))


def _phases(spec: dict) -> list[dict]:
    """One spec per training phase: the entry itself, then its fine-tuning phase if any."""
    phases = [spec]
    fine_tune = (spec.get("backbone") or {}).get("fine_tune")
    if fine_tune:
        optimizer = {**spec["optimizer"], "learning_rate": fine_tune["learning_rate"]}
        phases.append({**spec, "epochs": fine_tune["epochs"], "optimizer": optimizer, "unfreeze": fine_tune["unfreeze"]})
    return phases


def _backbone_weights(spec: dict, manifest: str | None) -> str | None:
    """The weights file to load into the backbone (None: random initialisation)."""
    backbone = spec.get("backbone")
    if not backbone or backbone.get("weights", "imagenet") == "none":
        return None
    if backbone.get("weights", "imagenet") == "imagenet":
        from cnnstudy import weights

        if not manifest:
            raise cli.JobError(f"{spec['name']}: ImageNet weights requested but no --weights-manifest given")
        return weights.verified_path(read_json(manifest))
    path = Path(backbone["weights"])
    if not path.is_file():
        raise FileNotFoundError(f"{spec['name']}: backbone weights file not found: {path}")
    return str(path)


def _epoch_logger(n_train: int, epochs: int, phase: int):
    import keras

    class EpochLogger(keras.callbacks.Callback):
        """Adds learning rate, epoch time and throughput to the logs; one progress line per epoch."""

        def on_epoch_begin(self, epoch, logs=None):
            self.t0, self.t_val = time.perf_counter(), None

        def on_test_begin(self, logs=None):
            if getattr(self, "t0", None) is not None and self.t_val is None:
                self.t_val = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            now = time.perf_counter()
            train_s = (self.t_val or now) - self.t0
            logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
            logs["epoch_time"] = now - self.t0
            logs["images_per_s"] = n_train / train_s
            logs["phase"] = phase
            log.info(
                "epoch %d/%d  loss %.4f  accuracy %.4f  val_loss %.4f  val_accuracy %.4f  lr %.3g  %.1f s  %.0f img/s",
                epoch + 1, epochs, logs.get("loss", math.nan), logs.get("accuracy", math.nan),
                logs.get("val_loss", math.nan), logs.get("val_accuracy", math.nan),
                logs["learning_rate"], logs["epoch_time"], logs["images_per_s"],
            )  # fmt: skip

    return EpochLogger()


def _test_accuracy(x_test: np.ndarray, y_test: np.ndarray, batch_size: int):
    import keras

    from cnnstudy import pipeline

    test_ds, labels = pipeline.eval_dataset(x_test, None, batch_size), y_test.argmax(axis=1)

    class TestAccuracy(keras.callbacks.Callback):
        """Test accuracy after each epoch (current weights, no TTA), for time-to-accuracy.

        Recorded only: early stopping and model selection never see it.
        """

        def on_epoch_end(self, epoch, logs=None):
            probs = self.model.predict(test_ds, verbose=0)
            logs["test_accuracy"] = float(np.mean(probs.argmax(axis=1) == labels))
            log.info("epoch %d  test_accuracy %.4f (recorded for time-to-accuracy only)", epoch + 1, logs["test_accuracy"])

    return TestAccuracy()


def main(
    data: str,
    spec: str | dict,
    model_out: str,
    history_out: str,
    info_out: str,
    state_dir: str,
    seed: int = 0,
    threads: int = 2,
    precision: str = "auto",
    weights_manifest: str | None = None,
) -> dict:
    started = time.time()
    spec = dict(spec) if isinstance(spec, dict) else read_json(spec)
    name = spec.get("name", "model")
    data_path, state = Path(data), Path(state_dir)
    if not data_path.is_file():
        raise FileNotFoundError(f"training data not found: {data_path}: run the preprocess rule first")
    weights_path = _backbone_weights(spec, weights_manifest)

    intra, inter = runtime.configure_threads(threads)
    import keras
    import pandas as pd
    import tensorflow as tf

    from cnnstudy import models, pipeline

    device = runtime.setup_device()
    policy = runtime.resolve_precision(precision, device)
    runtime.set_precision(policy)
    jit = runtime.resolve_jit(spec.get("jit_compile", "auto"), device, policy)
    runtime.seed_everything(seed)
    log.info("%s seed %d on %s %s, %s, XLA %s, threads intra=%d inter=%d", name, seed, device["kind"], device["name"], policy, jit, intra, inter)  # fmt: skip

    with np.load(data_path) as arrays:
        x_train, y_train = arrays["x_train"], arrays["y_train"]
        x_val, y_val = arrays["x_val"], arrays["y_val"]
        x_test, y_test = (arrays["x_test"], arrays["y_test"]) if spec.get("time_to_accuracy") else (None, None)
    phases = _phases(spec)
    total_epochs = sum(p["epochs"] for p in phases)

    resumed_from = _prepare_state(state, _fingerprint(spec, seed, policy, data_path))
    if resumed_from:
        log.info("resuming after epoch %d from %s", resumed_from, state)

    model = models.build_model(
        spec, num_classes=y_train.shape[1], input_shape=x_train.shape[1:], weights_path=weights_path, train_images=x_train
    )
    train_ds = pipeline.train_dataset(x_train, y_train, spec["batch_size"], seed)
    val_ds = pipeline.eval_dataset(x_val, y_val, spec["batch_size"])
    steps = math.ceil(len(x_train) / spec["batch_size"])

    start, early, fit_seconds = 0, None, 0.0
    for index, phase in enumerate(phases, start=1):
        end = start + phase["epochs"]
        done = state / f"phase{index}.done.json"
        if "unfreeze" in phase:
            models.set_backbone_trainable(model, phase["unfreeze"])
            log.info("phase %d: backbone unfrozen (%s), learning rate %g", index, phase["unfreeze"], phase["optimizer"]["learning_rate"])  # fmt: skip
        models.compile_model(model, phase, steps_per_epoch=steps, jit_compile=jit)
        if done.is_file():  # finished before the job was killed: take its weights, go on
            with np.load(state / f"phase{index}.weights.npz") as saved:
                model.set_weights([saved[f"arr_{i}"] for i in range(len(saved.files))])
            start = end
            continue
        callbacks = [_epoch_logger(len(x_train), total_epochs, index), keras.callbacks.TerminateOnNaN(raise_error=True)]
        if x_test is not None:  # after the epoch logger, so epoch_time excludes this evaluation
            callbacks.append(_test_accuracy(x_test, y_test, spec["batch_size"]))
        early = None
        if phase.get("early_stopping"):
            early = keras.callbacks.EarlyStopping(**{"monitor": "val_loss", **phase["early_stopping"]})
            callbacks.append(early)
        # CSVLogger before BackupAndRestore: a kill between the two repeats that epoch on
        # resume, and the history keeps its last row per epoch: no epoch lost or doubled.
        callbacks += [
            keras.callbacks.CSVLogger(str(state / "history.csv"), append=True),
            keras.callbacks.BackupAndRestore(str(state / f"phase{index}"), delete_checkpoint=False),
        ]
        fit_start = time.perf_counter()
        try:
            model.fit(
                train_ds,
                validation_data=val_ds,
                initial_epoch=start,
                epochs=end,
                callbacks=callbacks,
                shuffle=False,  # the dataset reshuffles itself every epoch
                verbose=0,
            )
        except RuntimeError as exc:
            if "NaN or Inf loss" not in str(exc):
                raise
            raise cli.JobError(
                f"{name} seed {seed}: training diverged ({exc}); no model was written. "
                f"Lower the learning rate ({phase['optimizer']['learning_rate']}) or check the data."
            ) from exc
        fit_seconds += time.perf_counter() - fit_start
        if index < len(phases):
            with atomic_path(state / f"phase{index}.weights.npz", suffix=".npz") as tmp, open(tmp, "wb") as fh:
                np.savez(fh, *model.get_weights())
            write_json(done, {"end_epoch": end})
        start = end

    history = pd.read_csv(state / "history.csv").drop_duplicates("epoch", keep="last").sort_values("epoch")
    history["epoch"] += 1  # 1-based, as in the logs
    history = history[["epoch", *sorted(c for c in history.columns if c != "epoch")]]
    bad = history[~np.isfinite(history[["loss", "val_loss"]]).all(axis=1)]
    if len(bad):
        raise cli.JobError(f"{name} seed {seed}: non-finite loss in epoch(s) {bad['epoch'].tolist()}; no model was written")
    kept = int(early.best_epoch) + 1 if early is not None and early.best_weights is not None else int(history["epoch"].iloc[-1])

    with atomic_path(model_out, suffix=".keras") as tmp:
        model.save(tmp)
    with atomic_path(history_out) as tmp:
        history.to_csv(tmp, index=False)
    info = {
        "model": name,
        "seed": seed,
        "spec_hash": configuration.spec_hash(spec),
        "spec": spec,
        "precision": policy,
        "jit_compile": jit,
        "device": device,
        "threads": {"intra_op": intra, "inter_op": inter},
        "backbone_weights": weights_path,
        "batch_size": spec["batch_size"],
        "epochs_requested": total_epochs,
        "epochs_run": len(history),
        "kept_epoch": kept,
        "stopped_early": bool(early is not None and early.stopped_epoch > 0),
        "resumed_from_epoch": resumed_from,
        "n_train": len(x_train),
        "n_val": len(x_val),
        "params": model.count_params(),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "train_seconds": float(history["epoch_time"].sum()),
        "fit_seconds_this_run": fit_seconds,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__, "numpy": np.__version__},
        "started": started,
        "finished": time.time(),
    }
    write_json(info_out, info)
    shutil.rmtree(state, ignore_errors=True)
    log.info("%s seed %d: %d epoch(s), kept epoch %d, %.0f s; wrote %s", name, seed, len(history), kept, info["train_seconds"], model_out)  # fmt: skip
    return info


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="preprocessed .npz")
    p.add_argument("--spec", required=True, help="the model entry as JSON (results/specs/<model>.json)")
    p.add_argument("--model-out", required=True)
    p.add_argument("--history-out", required=True)
    p.add_argument("--info-out", required=True)
    p.add_argument("--state-dir", required=True, help="resumable state (kept outside the outputs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto", choices=["auto", "float32", "mixed_bfloat16", "mixed_float16"])
    p.add_argument("--weights-manifest", default=None, help="fetch_weights manifest for ImageNet backbones")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
