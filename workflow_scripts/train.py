"""Train one model entry with one seed.

Keras does the work: fit with EarlyStopping (if the entry asks), TerminateOnNaN (a NaN or
Inf loss fails the job with a clear message) and BackupAndRestore, extended so that a job
killed at any moment and rerun gives the same history, weights and metrics, bit for bit, as
one never interrupted (cnnstudy.training, cnnstudy.checkpoint). The resumable state lives in
``--state-dir``, outside the job's outputs, so Snakemake's cleanup of incomplete outputs
never deletes it; it is removed once the outputs are written, and discarded if the entry,
seed, precision or data changed since it was saved.

Transfer-learning entries may have a second phase (``backbone.fine_tune``: the Keras
guide's recipe): after the first ``epochs`` more of the backbone is unfrozen and training
goes on at a lower rate.

    python workflow_scripts/train.py --data results/data/cifar10.npz --spec results/specs/model_10.json \\
        --model-out model.keras --history-out history.csv --info-out train_info.json \\
        --state-dir results/train_state/model_10/seed_0 --seed 0 --threads 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import numpy as np

from cnnstudy import checkpoint, cli, configuration, provenance, runtime
from cnnstudy.io import atomic_path, read_json, write_json

log = logging.getLogger("cnnstudy.train")

# History columns that measure wall-clock time, not the model: the only ones allowed to
# differ between a resumed and an uninterrupted run.
TIMING_COLUMNS = ("epoch_time", "images_per_s")


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
    require_gpu: str = "auto",
    deterministic_ops: bool = True,
) -> dict:
    started = time.time()
    spec = dict(spec) if isinstance(spec, dict) else read_json(spec)
    name = spec.get("name", "model")
    data_path = Path(data)
    if not data_path.is_file():
        raise FileNotFoundError(f"training data not found: {data_path}: run the preprocess rule first")
    weights_path = _backbone_weights(spec, weights_manifest)
    job = {"spec_hash": configuration.spec_hash(spec), "seed": seed, "precision": precision,
           "data": [data_path.stat().st_size, data_path.stat().st_mtime_ns]}  # fmt: skip
    state = checkpoint.TrainingState(state_dir, job)
    # Reduction order, hence the numbers, depends on the thread count: a resumed job keeps its own.
    intra, inter = runtime.configure_threads(state.keep("threads", runtime.allotted_threads(threads)))
    import keras
    import pandas as pd

    from cnnstudy import models, training

    device = runtime.setup_device(require_gpu, deterministic_ops)
    policy = state.keep("precision_policy", runtime.resolve_precision(precision, device))
    runtime.set_precision(policy)
    jit = runtime.resolve_jit(spec.get("jit_compile", "auto"), device, policy)
    runtime.seed_everything(seed)
    log.info("%s seed %d on %s %s, %s, XLA %s, threads intra=%d inter=%d", name, seed, device["kind"], device["name"], policy, jit, intra, inter)  # fmt: skip

    with np.load(data_path) as arrays:
        train, val = (arrays["x_train"], arrays["y_train"]), (arrays["x_val"], arrays["y_val"])
        test = (arrays["x_test"], arrays["labels_test"]) if spec.get("time_to_accuracy") else None
    model = models.build_model(spec, num_classes=train[1].shape[1], input_shape=train[0].shape[1:],
                               weights_path=weights_path, train_images=train[0])  # fmt: skip
    resumed_from = state.latest.epoch if state.latest else 0
    if resumed_from:
        log.info("resuming after epoch %d (phase %d) from %s", resumed_from, state.latest.phase, state.latest.path)
    fit_start = time.perf_counter()
    try:
        result = training.fit_phases(model, spec, seed, state, train, val, jit, evaluate_on=test)
    except RuntimeError as exc:
        if "NaN or Inf loss" not in str(exc):
            raise
        raise cli.JobError(
            f"{name} seed {seed}: training diverged ({exc}); no model was written. "
            f"Lower the learning rate ({spec['optimizer']['learning_rate']}) or check the data."
        ) from exc

    history = pd.DataFrame(result["rows"])
    history = history[["epoch", *sorted(c for c in history.columns if c != "epoch")]]
    bad = history[~np.isfinite(history[["loss", "val_loss"]]).all(axis=1)]
    if len(bad):
        raise cli.JobError(f"{name} seed {seed}: non-finite loss in epoch(s) {bad['epoch'].tolist()}; no model was written")
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
        "epochs_requested": sum(p["epochs"] for p in training.phases(spec)),
        "epochs_run": len(history),
        "kept_epoch": result["kept_epoch"],
        "stopped_early": result["stopped_early"],
        "resumed_from_epoch": resumed_from,
        "n_train": len(train[0]),
        "n_val": len(val[0]),
        "params": model.count_params(),
        "trainable_params": int(sum(np.prod(w.shape) for w in model.trainable_weights)),
        "train_seconds": float(history["epoch_time"].sum()),
        "fit_seconds_this_run": time.perf_counter() - fit_start,
        "provenance": provenance.record("train.py", started=started, finished=time.time()),
    }
    write_json(info_out, info)
    state.remove()
    log.info("%s seed %d: %d epoch(s), kept epoch %d, %.0f s; wrote %s", name, seed, len(history), info["kept_epoch"], info["train_seconds"], model_out)  # fmt: skip
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
    p.add_argument("--require-gpu", default="auto", choices=["auto", "true", "false"])
    p.add_argument("--deterministic-ops", default=True, type=lambda v: v.lower() == "true", help="true|false (GPUs)")
    return p


if __name__ == "__main__":
    sys.exit(cli.run(main, parser()))
