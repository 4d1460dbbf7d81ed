"""Train one model entry with one seed.

Keras does the work: fit with EarlyStopping (if the entry asks), TerminateOnNaN (a NaN or
Inf loss fails the job with a clear message) and a checkpoint after every epoch (what Keras'
BackupAndRestore saves, and the rest), so that a job killed at any moment and rerun gives
the same history, weights and metrics, bit for bit, as one never interrupted
(cnnstudy.training, cnnstudy.checkpoint). The resumable state lives in ``--state-dir``, outside
the job's outputs, so Snakemake's cleanup of incomplete outputs never deletes it; it is removed
once the outputs are written, and discarded if the entry, seed, precision or data changed since
it was saved.

Transfer-learning entries may have a second phase (``backbone.fine_tune``: the Keras
guide's recipe): after the first ``epochs`` more of the backbone is unfrozen and training
goes on at a lower rate.

    python workflow_scripts/train.py --data results/data/cifar10.npz --spec results/specs/model_10.json \\
        --model-out model.keras --history-out history.csv --info-out train_info.json \\
        --state-dir results/train_state/model_10/seed_0 --seed 0 --threads 2
"""

from __future__ import annotations

import json
import logging
import sys
import time
import typing
from pathlib import Path

import numpy as np

from cnnstudy import checkpoint, cli, configuration, protocols, provenance, runtime
from cnnstudy.errors import JobError
from cnnstudy.files import atomic_path, ensure_space, read_json, write_json

log = logging.getLogger("cnnstudy.train")


def _backbone_weights(spec: dict, manifest: str | None) -> str | None:
    """The weights file to load into the backbone (None: random initialisation)."""
    source = configuration.weights_source(spec)
    if source == "none":
        return None
    if source == "imagenet":
        from cnnstudy import weights

        if not manifest:
            raise JobError(f"{spec['name']}: ImageNet weights requested but no --weights-manifest given")
        return weights.verified_path(read_json(manifest))
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"{spec['name']}: backbone weights file not found: {path}")
    return str(path)


def _job(spec: dict, seed: int, precision: str, data: Path, refit: dict | None) -> dict:
    """What a resumable state belongs to: another entry, seed, precision, data or refit epoch
    count starts afresh."""
    if not data.is_file():
        raise FileNotFoundError(f"training data not found: {data}: run the preprocess rule first")
    stat = data.stat()
    job = {
        "spec_hash": configuration.spec_hash(spec),
        "seed": seed,
        "precision": precision,
        "data": [stat.st_size, stat.st_mtime_ns],
    }
    return {**job, "refit_epochs": refit["epochs"]} if refit else job


def _refit(spec: dict, seed: int, epochs_from: str | None) -> dict | None:
    """A refit's epoch count, from its holdout run's metrics (``epochs_from``); None otherwise."""
    if protocols.of(spec) != "refit":
        return None
    if not epochs_from:
        raise JobError(f"{spec['name']}: a refit needs --epochs-from, its holdout run's metrics.json")
    metrics = read_json(epochs_from)
    holdout = protocols.holdout_spec(spec)
    if (metrics.get("model"), metrics.get("seed")) != (holdout["name"], seed):
        raise JobError(
            f"{epochs_from} is the metrics of {metrics.get('model')} seed {metrics.get('seed')}, "
            f"not of {holdout['name']} seed {seed}, the holdout run of this refit"
        )
    epochs = protocols.refit_epochs(metrics, configuration.spec_hash(holdout), epochs_from)
    return {"epochs": epochs, "epochs_from": str(epochs_from), "holdout_run": f"{holdout['name']} seed {seed}"}


def _splits(data: str, spec: dict, refit: dict | None) -> tuple:
    """The training, validation and (for time-to-accuracy) test arrays the entry's protocol uses."""
    protocol = protocols.of(spec)
    with np.load(data) as arrays:
        splits = protocols.splits(arrays, protocol, with_test=spec["time_to_accuracy"])
    log.info(
        "protocol %s: %d training images, epochs chosen on the %s%s",
        protocol,
        len(splits[0][0]),
        protocols.EPOCHS_CHOSEN_ON[protocol],
        f": {refit['epochs']} epoch(s), kept by {refit['holdout_run']} ({refit['epochs_from']})" if refit else "",
    )
    return splits


def _model(spec: dict, train: tuple, weights_path: str | None):
    """The entry's Keras model, logged as resolved and as Keras summarises it."""
    from cnnstudy import models

    model = models.build_model(
        spec,
        num_classes=train[1].shape[1],
        input_shape=train[0].shape[1:],
        weights_path=weights_path,
        train_images=train[0],
    )
    log.info("the entry as resolved (its training spec):\n%s", json.dumps(spec, indent=1, sort_keys=True))
    model.summary(print_fn=lambda line, *_, **__: log.info("%s", line), line_length=79)  # rich: 80 columns
    return model


def _write_outputs(model, history, model_out: str, history_out: str, state_dir: str) -> None:
    """The trained model and its history, each written whole or not at all, after checking the
    disk has room for the model (the training state is kept until they are written)."""
    weights_bytes = sum(int(np.prod(w.shape)) * np.dtype(w.dtype).itemsize for w in model.weights)
    ensure_space(
        model_out,
        int(1.1 * weights_bytes) + 2**20,
        "the trained model",
        f"nothing was written; the training state in {state_dir} is kept: "
        "free space and rerun the job, it writes the same outputs without retraining",
    )
    with atomic_path(model_out, suffix=".keras") as tmp:
        model.save(tmp)
    with atomic_path(history_out) as tmp:
        history.to_csv(tmp, index=False)


def _protocol_record(spec: dict, refit: dict | None) -> dict:
    protocol = protocols.of(spec)
    return {
        "name": protocol,
        "trains_on": protocols.TRAINS_ON[protocol],
        "epochs_chosen_on": protocols.EPOCHS_CHOSEN_ON[protocol],
        "test_selected": protocol == "study",
        **(refit or {}),
    }


def main(
    data: str,
    spec: str | dict,
    model_out: str,
    history_out: str,
    info_out: str,
    state_dir: str,
    seed: int = 0,
    threads: int = 2,
    precision: runtime.Precision = "auto",
    weights_manifest: str | None = None,
    require_gpu: typing.Literal["auto", "true", "false"] = "auto",
    deterministic_ops: bool = True,
    stop_after_epoch: int | None = None,
    epochs_from: str | None = None,
) -> dict:
    started = time.time()
    spec = spec if isinstance(spec, dict) else read_json(spec)
    job = f"{spec['name']} seed {seed}"
    refit = _refit(spec, seed, epochs_from)
    backend = runtime.select_backend(spec.get("backend", "tensorflow"))  # before anything imports Keras
    state = checkpoint.TrainingState(state_dir, _job(spec, seed, precision, Path(data), refit))
    weights_path = _backbone_weights(spec, weights_manifest)
    env = runtime.prepare(
        threads, precision, spec["jit_compile"], seed, require_gpu, deterministic_ops, keep=state.keep
    )
    from cnnstudy import models, training  # noqa: F401  (Keras after the backend, threads and seeds are set)

    device, threads_used = env["device"], env["threads"]["intra_op"]
    log.info(
        f"{job} on {device['kind']} {device['name']}, Keras on {backend}, {env['precision']}, "
        f"XLA {env['jit_compile']}, {threads_used} thread(s)"
    )
    train, val, test = _splits(data, spec, refit)
    model = _model(spec, train, weights_path)
    resumed_from = state.latest.epoch if state.latest else 0
    if resumed_from:
        log.info("resuming after epoch %d (phase %d) from %s", resumed_from, state.latest.phase, state.latest.path)
    # Live curves under the job's results folder, for `tensorboard --logdir`; Keras' TensorBoard callback
    # writes through TensorFlow, which a JAX job never imports.
    live = str(Path(model_out).parent / "tensorboard") if backend == "tensorflow" else None
    limits = [e for e in (stop_after_epoch, refit["epochs"] if refit else None) if e is not None]
    fit = training.fit_phases(
        model,
        protocols.fit_spec(spec),
        seed,
        state,
        train,
        val,
        env["jit_compile"],
        evaluate_on=test,
        tensorboard=live,
        stop_after=min(limits) if limits else None,
    )
    history = training.history_frame(fit["rows"], job)
    _write_outputs(model, history, model_out, history_out, state_dir)
    info = {
        "model": spec["name"],
        "seed": seed,
        "spec_hash": configuration.spec_hash(spec),
        "spec": spec,
        **env,
        "backend": backend,
        "backbone_weights": weights_path,
        **training.summary(model, spec, history, fit, len(train[0]), len(val[0]) if val else 0),
        "protocol": _protocol_record(spec, refit),
        "resumed_from_epoch": resumed_from,
        "provenance": provenance.record("train.py", started=started, finished=time.time()),
    }
    write_json(info_out, info)
    state.remove()
    log.info(
        f"{job}: {len(history)} epoch(s), kept epoch {info['kept_epoch']}, {info['train_seconds']:.0f} s; wrote {model_out}"
    )
    return info


HELP = {
    "data": "preprocessed .npz",
    "spec": "the model entry as JSON (results/specs/<model>.json)",
    "state_dir": "resumable state (kept outside the outputs)",
    "weights_manifest": "fetch_weights manifest for ImageNet backbones",
    "deterministic_ops": "deterministic GPU kernels",
    "epochs_from": "a refit's epoch count: its holdout run's metrics.json (its kept epoch)",
    "stop_after_epoch": "end after this epoch, as if interrupted (verify_published: never a finished job's outputs)",
}

if __name__ == "__main__":
    sys.exit(cli.run(main, unused=runtime.STARTUP_EXTRAS, help=HELP))
