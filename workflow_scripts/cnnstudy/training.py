"""Fitting a model entry, phase by phase, with exact resume.

A checkpoint after every epoch (EpochCheckpoint, on Keras' public save_weights and load_weights)
holds the weights, BatchNorm statistics and optimizer variables (step, momentum, EMA). For a
resumed job to repeat an uninterrupted one bit for bit, the rest must not depend on how many
epochs this process has run:

- the order of the training images: drawn per epoch from (seed, epoch) (datasets.epoch_order);
- the random layers (augmentation, Dropout): their seed states are set at the start of every
  epoch from (seed, epoch, layer) (EpochSeeds);
- EarlyStopping's counters and best weights, and the history rows: saved with each checkpoint
  (ResumableEarlyStopping, EpochCheckpoint), which is written as one sealed unit
  (checkpoint.TrainingState).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from dataclasses import dataclass

import keras
import numpy as np
import pandas as pd

from . import datasets, models, predict
from .checkpoint import Checkpoint, TrainingState
from .errors import JobError
from .files import collect_quietly, disk_full, disk_full_error, ensure_space

log = logging.getLogger("cnnstudy.train")

# History columns that measure wall-clock time (EpochLogger), not the model: the only ones allowed
# to differ between a resumed and an uninterrupted run, or a rerun.
TIMING_COLUMNS = ("epoch_time", "images_per_s")
SEED_STATE = "seed_generator_state"  # the variable name keras.random.SeedGenerator gives its state


def seed_states(model: keras.Model) -> list:
    """The state variables of every keras.random.SeedGenerator in the model, in layer order."""
    return [v for v in model.variables if v.name == SEED_STATE]


def epoch_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0] & 0x7FFFFFFF)


class EpochSeeds(keras.callbacks.Callback):
    """At the start of epoch e, random layer i draws from seed state (f(seed, e, i), 0)."""

    def __init__(self, seed: int):
        super().__init__()
        self.seed = seed

    def on_epoch_begin(self, epoch, logs=None):
        for index, state in enumerate(seed_states(self.model)):
            state.assign(np.array([epoch_seed(self.seed, epoch, index), 0]).astype(state.dtype))


class FreezeWhiteningBias(keras.callbacks.Callback):
    """A PatchWhitening layer with ``bias_epochs`` trains its bias in epochs 0 .. bias_epochs-1
    only (airbench94_muon); set at the start of every epoch from the epoch alone."""

    def on_epoch_begin(self, epoch, logs=None):
        from .layers import PatchWhitening

        for layer in self.model.layers:
            if isinstance(layer, PatchWhitening) and layer.bias_epochs is not None:
                layer.bias_on.assign(1.0 if epoch < layer.bias_epochs else 0.0)


class EpochLogger(keras.callbacks.Callback):
    """Adds learning rate, phase, epoch time and throughput to the logs; one progress line per epoch."""

    def __init__(self, n_train: int, total_epochs: int, phase: int):
        super().__init__()
        self.n_train, self.total_epochs, self.phase = n_train, total_epochs, phase

    def on_epoch_begin(self, epoch, logs=None):
        self.t0, self.t_val = time.perf_counter(), None

    def on_test_begin(self, logs=None):
        if getattr(self, "t0", None) is not None and self.t_val is None:
            self.t_val = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        now = time.perf_counter()
        logs["learning_rate"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        logs["epoch_time"] = now - self.t0
        logs["images_per_s"] = self.n_train / ((self.t_val or now) - self.t0)
        logs["phase"] = self.phase
        log_epoch(epoch + 1, self.total_epochs, logs)


def log_epoch(epoch: int, total_epochs: int, row: dict, prefix: str = "") -> None:
    """One progress line: an epoch just trained, or (``prefix``) one restored from a checkpoint."""
    validation = (
        f"  val_loss {row['val_loss']:.4f}  val_accuracy {row['val_accuracy']:.4f}" if "val_loss" in row else ""
    )
    log.info(
        "%sepoch %d/%d  loss %.4f  accuracy %.4f%s  lr %.3g  %.1f s  %.0f img/s",
        prefix,
        epoch,
        total_epochs,
        row.get("loss", math.nan),
        row.get("accuracy", math.nan),
        validation,
        row["learning_rate"],
        row["epoch_time"],
        row["images_per_s"],
    )


class EvaluatedAccuracy(keras.callbacks.Callback):
    """Test accuracy after every epoch of the model as it would be evaluated (its weight
    average, its test-time augmentation), for the time-to-accuracy columns.

    Recorded only: early stopping and model selection never see it. Placed after EpochLogger,
    so epoch_time excludes it.
    """

    def __init__(self, x_test: np.ndarray, labels: np.ndarray, tta: str):
        super().__init__()
        self.x_test, self.labels, self.tta = x_test, labels, tta

    def on_epoch_end(self, epoch, logs=None):
        with predict.evaluated_weights(self.model):
            probs, _ = predict.predict_views(self.model, self.x_test, self.tta)
        logs["test_accuracy"] = float(np.mean(probs.argmax(axis=1) == self.labels))
        log.info(
            "epoch %d  test_accuracy %.4f (as evaluated; recorded for time-to-accuracy only)",
            epoch + 1,
            logs["test_accuracy"],
        )


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras' EarlyStopping whose counters and best weights survive a restart."""

    def __init__(self, restored: dict | None = None, best_weights: list | None = None, **kwargs):
        super().__init__(**kwargs)
        self.restored, self.restored_weights = restored, best_weights

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self.restored:
            for key in ("wait", "best", "best_epoch", "stopped_epoch"):
                setattr(self, key, self.restored[key])
            self.best_weights = self.restored_weights

    def state(self) -> dict:
        best = None if self.best is None else float(self.best)
        return {
            "wait": int(self.wait),
            "best": best,
            "best_epoch": int(self.best_epoch),
            "stopped_epoch": int(self.stopped_epoch),
        }

    @property
    def stopped(self) -> bool:
        return self.stopped_epoch > 0


class EpochCheckpoint(keras.callbacks.Callback):
    """Each finished epoch written as one sealed checkpoint of ``state`` (checkpoint.TrainingState),
    and the resume from it, on public Keras alone (as Keras' BackupAndRestore does it, without its
    private members): ``Model.save_weights`` holds the weights, BatchNorm statistics and optimizer
    variables (step, momentum, EMA); the checkpoint adds what they leave out, the history rows and
    EarlyStopping's state.

    The resumed epoch is fit_phases' ``initial_epoch``. Place this callback last, so the history
    row it saves has every other callback's additions.
    """

    WEIGHTS, BEST = "model.weights.h5", "best.weights.npz"

    def __init__(self, state: TrainingState, phase: int, rows: list[dict], early: ResumableEarlyStopping | None):
        super().__init__()
        self.state, self.phase, self.rows, self.early = state, phase, rows, early
        latest = state.latest
        self.resume = latest if latest is not None and latest.phase == phase else None

    def on_train_begin(self, logs=None):
        if self.resume is None:
            return
        optimizer = self.model.optimizer
        if optimizer is not None and not optimizer.built:  # its variables must exist to be loaded
            optimizer.build(self.model.trainable_variables)
        self.model.load_weights(str(self.resume.file(self.WEIGHTS)))

    def on_epoch_end(self, epoch, logs=None):
        self.rows.append({"epoch": epoch + 1, **{k: v if isinstance(v, int) else float(v) for k, v in logs.items()}})
        self.save(epoch + 1)

    def checkpoint_bytes(self) -> int:
        """The space the next checkpoint needs: the last one's size, else its variables' bytes."""
        if self.state.latest is not None:
            return sum(p.stat().st_size for p in self.state.latest.path.iterdir() if p.is_file())
        variables = [*self.model.variables, *self.model.optimizer.variables]
        best = len(self.model.weights) if self.early is not None else 0
        return (
            int(1.1 * sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)) * (2 if best else 1)
            + 2**20
        )

    def save(self, epoch: int) -> None:
        sealed = self.state.latest.epoch if self.state.latest else 0
        then = (
            f"the last sealed checkpoint (after epoch {sealed}) is kept; free space and rerun the job: it resumes "
            "there and gives the same result"
        )
        ensure_space(self.state.root, self.checkpoint_bytes(), f"the checkpoint of epoch {epoch} into", then)
        tmp = self.state.begin(self.phase, epoch)
        try:
            self._save_into(tmp, epoch)
            return
        except OSError as exc:  # the checkpoint stays unsealed (ignored); the last sealed one is kept
            if not disk_full(exc):
                raise
            error = disk_full_error(tmp, f"the checkpoint of epoch {epoch} into", then)
        # Outside the handler, so the failed write's frames are gone: close h5py's half-written
        # file now (its close fails again, quietly) rather than at exit, where it crashes.
        collect_quietly()
        shutil.rmtree(tmp, ignore_errors=True)
        raise error

    def _save_into(self, tmp, epoch: int) -> None:
        self.model.save_weights(str(tmp / self.WEIGHTS))
        extra = {"history": self.rows, "early_stopping": None}
        if self.early is not None:
            extra["early_stopping"] = self.early.state()
            if self.early.best_weights is not None:
                with open(tmp / self.BEST, "wb") as fh:
                    np.savez(fh, *self.early.best_weights)
        self.state.commit(tmp, self.phase, epoch, extra)


def _restored_early_stopping(settings: dict, resume: Checkpoint | None) -> ResumableEarlyStopping:
    saved, weights = (resume.state.get("early_stopping") if resume else None), None
    if saved and resume.file(EpochCheckpoint.BEST).is_file():
        with np.load(resume.file(EpochCheckpoint.BEST)) as npz:
            weights = [npz[f"arr_{i}"] for i in range(len(npz.files))]
    return ResumableEarlyStopping(restored=saved, best_weights=weights, **settings)


def phases(spec: dict) -> list[dict]:
    """One spec per training phase: the entry itself, then its fine-tuning phase if any."""
    result = [spec]
    fine_tune = (spec.get("backbone") or {}).get("fine_tune")
    if fine_tune:
        optimizer = {**spec["optimizer"], "learning_rate": fine_tune["learning_rate"]}
        result.append(
            {**spec, "epochs": fine_tune["epochs"], "optimizer": optimizer, "unfreeze": fine_tune["unfreeze"]}
        )
    return result


def fit_phases(
    model,
    spec: dict,
    seed: int,
    state: TrainingState,
    train,
    val,
    jit,
    evaluate_on=None,
    tensorboard: str | None = None,
    stop_after: int | None = None,
) -> dict:
    """Train ``model`` through every phase of ``spec``, resuming from ``state``'s checkpoint.

    ``train`` and ``val`` are (images, one-hot labels); ``evaluate_on`` (images, labels)
    records the evaluated test accuracy after every epoch; ``tensorboard`` is a folder for
    TensorBoard's event files (live curves: ``tensorboard --logdir results/``); ``stop_after``
    ends training after that epoch (counted over all phases) as if interrupted there, the schedules
    still set for every epoch of the entry (verify_published). Returns the history rows, the kept
    epoch and whether early stopping ended training.
    """
    resume = state.latest
    job = _Job.start(model, spec, seed, state, train, val, jit, evaluate_on, tensorboard, resume)
    start, early = 0, None
    for index, phase in enumerate(phases(spec), start=1):
        end = start + phase["epochs"]
        if resume is not None and resume.phase > index:  # finished before the job was stopped
            start = end
            continue
        here = resume if resume is not None and resume.phase == index else None
        early = _train_phase(job, index, phase, here, *_epoch_range(here, start, end, stop_after))
        start = end
        if stop_after is not None and end >= stop_after:
            break
    rows = job.rows
    kept = early.best_epoch + 1 if early is not None and early.best_weights is not None else rows[-1]["epoch"]
    return {"rows": rows, "kept_epoch": int(kept), "stopped_early": bool(early is not None and early.stopped)}


@dataclass
class _Job:
    """What every phase of one training job shares."""

    model: keras.Model
    spec: dict
    seed: int
    state: TrainingState
    train: tuple
    val_ds: object  # a tf.data.Dataset on TensorFlow, else the (images, labels) arrays; None on refit
    jit: bool | str
    evaluate_on: tuple | None
    tensorboard: str | None
    steps: int  # batches per epoch
    total: int  # epochs over all phases
    rows: list[dict]  # the history, restored from the checkpoint and grown by EpochCheckpoint

    @classmethod
    def start(cls, model, spec, seed, state, train, val, jit, evaluate_on, tensorboard, resume) -> _Job:
        """The job's shared settings, its restored history logged again (`> {log}` started it afresh)."""
        batch, drop_last = spec["batch_size"], spec.get("drop_last", False)
        steps = datasets.steps_per_epoch(len(train[0]), batch, drop_last)
        if steps == 0:
            raise JobError(
                f"{spec['name']}: drop_last with batch_size {batch} > {len(train[0])} training images leaves no batch"
            )
        tf_data = keras.backend.backend() == "tensorflow"  # else NumPy batches (datasets.epoch_batches)
        val_ds = None if val is None else datasets.eval_dataset(*val, batch) if tf_data else val
        total = sum(p["epochs"] for p in phases(spec))
        rows: list[dict] = list(resume.state["history"]) if resume else []
        for row in rows:
            log_epoch(row["epoch"], total, row, prefix="restored ")
        return cls(model, spec, seed, state, train, val_ds, jit, evaluate_on, tensorboard, steps, total, rows)


def _train_phase(job: _Job, index: int, phase: dict, here: Checkpoint | None, first: int, last: int):
    """Phase ``index`` of the job, epochs ``first`` to ``last``: the backbone unfrozen if the phase
    says so, the model compiled for it, fitted from its checkpoint ``here`` (if any). Returns its
    early stopping (None without)."""
    spec, batch, drop_last = job.spec, job.spec["batch_size"], job.spec.get("drop_last", False)
    if "unfreeze" in phase:
        models.set_backbone_trainable(job.model, phase["unfreeze"])
        log.info(
            "phase %d: backbone unfrozen (%s), learning rate %g",
            index,
            phase["unfreeze"],
            phase["optimizer"]["learning_rate"],
        )
    models.compile_model(job.model, phase, steps_per_epoch=job.steps, jit_compile=job.jit)
    early = _restored_early_stopping(phase["early_stopping"], here) if phase.get("early_stopping") else None
    callbacks = _callbacks(
        spec,
        job.seed,
        index,
        job.total,
        datasets.images_per_epoch(len(job.train[0]), batch, drop_last),
        job.evaluate_on,
        job.tensorboard,
        early,
        EpochCheckpoint(job.state, index, job.rows, early),
    )
    batches = datasets.training_batches(
        *job.train, batch, job.seed, first, last, drop_last, spec.get("alternating_flip", False)
    )
    val_batch = None if keras.backend.backend() == "tensorflow" else batch  # NumPy arrays are batched by fit
    _fit(
        job.model,
        batches,
        job.steps,
        job.val_ds,
        val_batch,
        first,
        last,
        callbacks,
        f"{spec['name']} seed {job.seed}",
        phase,
    )
    return early


def _epoch_range(here: Checkpoint | None, start: int, end: int, stop_after: int | None) -> tuple[int, int]:
    """The epochs a phase's fit runs, ``first`` to ``last``, from its checkpoint ``here`` (if any).

    Finished, or stopped early, before the kill: a fit of no epochs restores the checkpoint and
    ends as the uninterrupted fit ended (EMA values, best weights). ``stop_after`` at or before a
    checkpoint: a fit of no epochs restores it.
    """
    first = here.epoch if here else start
    stopped = bool(here and (here.state.get("early_stopping") or {}).get("stopped_epoch"))
    last = first if stopped or first >= end else end
    if stop_after is not None:
        last = min(last, max(first, stop_after))
    return first, last


def _callbacks(
    spec: dict,
    seed: int,
    phase: int,
    total: int,
    per_epoch: int,
    evaluate_on,
    tensorboard: str | None,
    early: ResumableEarlyStopping | None,
    checkpoint: EpochCheckpoint,
) -> list:
    """A phase's callbacks, in the order their additions to an epoch's logs need: the reseeding
    first, the loggers and readers of the logs after what they read, the checkpoint last."""
    callbacks = [
        EpochSeeds(seed),
        FreezeWhiteningBias(),
        EpochLogger(per_epoch, total, phase),
        keras.callbacks.TerminateOnNaN(raise_error=True),
    ]
    if evaluate_on is not None:
        callbacks.append(EvaluatedAccuracy(*evaluate_on, spec["tta"]))
    if tensorboard:  # after the callbacks that add to the epoch's logs; it only reads them
        callbacks.append(keras.callbacks.TensorBoard(tensorboard, write_graph=False, update_freq="epoch"))
    return [*callbacks, *([early] if early is not None else []), checkpoint]


def _fit(
    model,
    batches,
    steps: int,
    val_ds,
    val_batch: int | None,
    first: int,
    last: int,
    callbacks: list,
    job: str,
    phase: dict,
) -> None:
    """One phase's ``model.fit``; a NaN or Inf loss (TerminateOnNaN) fails the job, naming its rate."""
    try:
        model.fit(
            batches,
            steps_per_epoch=steps,
            validation_data=val_ds,
            validation_batch_size=val_batch,
            initial_epoch=first,
            epochs=last,
            callbacks=callbacks,
            shuffle=False,  # the dataset is already in each epoch's order
            verbose=0,
        )
    except RuntimeError as exc:  # TerminateOnNaN
        if "NaN or Inf loss" not in str(exc):
            raise
        raise JobError(
            f"{job}: training diverged ({exc}); no model was written. Lower the "
            f"learning rate ({phase['optimizer']['learning_rate']}) or check the data."
        ) from exc


def history_frame(rows: list[dict], job: str) -> pd.DataFrame:
    """The history rows as a table (epoch first); a non-finite loss anywhere fails the job."""
    history = pd.DataFrame(rows)
    history = history[["epoch", *sorted(c for c in history.columns if c != "epoch")]]
    losses = [c for c in ("loss", "val_loss") if c in history]  # a refit has no validation
    bad = history[~np.isfinite(history[losses]).all(axis=1)]
    if len(bad):
        raise JobError(f"{job}: non-finite loss in epoch(s) {bad['epoch'].tolist()}; no model was written")
    return history


def summary(model, spec: dict, history: pd.DataFrame, fit: dict, n_train: int, n_val: int) -> dict:
    """What training says about itself: epochs, kept epoch, time, size."""
    return {
        "batch_size": spec["batch_size"],
        "epochs_requested": sum(p["epochs"] for p in phases(spec)),
        "epochs_run": len(history),
        "kept_epoch": fit["kept_epoch"],
        "stopped_early": fit["stopped_early"],
        "n_train": n_train,
        "images_per_epoch": datasets.images_per_epoch(n_train, spec["batch_size"], spec.get("drop_last", False)),
        "n_val": n_val,
        "params": model.count_params(),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "train_seconds": float(history["epoch_time"].sum()),
    }
