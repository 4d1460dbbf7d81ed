"""Exact resume: a training job killed at any moment and rerun equals one never interrupted.

The resume matrix runs each kind of entry once straight through (the reference) and once
killed with SIGKILL at a given point, then rerun; history (all but wall-clock columns), kept
epoch, saved weights and test metrics must be bit-identical. The state directory's own rules
(sealed checkpoints, checksums, clean-up) are tested without TensorFlow first.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import subprocess
from pathlib import Path

import evaluate
import keras
import numpy as np
import pandas as pd
import pytest
import train

from cnnstudy import checkpoint, predict, training

from conftest import (
    SHARED_RUNS,
    early,
    entry_with,
    load_ladder,
    saved_epoch,
    train_cli,
    two_at_a_time,
    until_session_end,
    wait_for_epoch,
)

# ---- the state directory ------------------------------------------------------------------


def _seal(state: checkpoint.TrainingState, phase: int, epoch: int, payload: bytes = b"weights") -> Path:
    tmp = state.begin(phase, epoch)
    (tmp / "model.weights.h5").write_bytes(payload * 100)
    return state.commit(tmp, phase, epoch, {"history": [{"epoch": epoch}]}).path


def test_checkpoints_are_sealed_units_and_only_the_two_newest_are_kept(tmp_path):
    state = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    for epoch in (1, 2, 3):
        _seal(state, 1, epoch)
    assert [p.name for *_, p in state.checkpoints()] == ["p1-e0002", "p1-e0003"]
    again = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    assert again.latest.epoch == 3 and again.latest.state["history"] == [{"epoch": 3}]
    assert set(again.latest.state["files"]) == {"model.weights.h5"}


def test_a_corrupt_checkpoint_is_set_aside_and_the_one_before_resumed(tmp_path, caplog):
    state = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    _seal(state, 1, 1)
    newest = _seal(state, 1, 2)
    with open(newest / "model.weights.h5", "r+b") as fh:  # a kill or a disk error mid-write
        fh.truncate(10)
    (tmp_path / "s" / ".tmp-p1-e0003-99").mkdir()  # a checkpoint whose writing was interrupted
    with caplog.at_level(logging.WARNING, logger="cnnstudy.checkpoint"):
        again = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    assert again.latest.epoch == 1
    assert "p1-e0002 is unreadable (model.weights.h5: checksum mismatch" in caplog.text and "set aside" in caplog.text
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    assert names[:3] == ["job.json", "p1-e0001", "p1-e0002.unreadable-" + names[2].split("unreadable-")[1]]
    assert not any(n.startswith(".tmp-") for n in names)
    # The set-aside checkpoint is never retried: the next start resumes from the same one.
    assert checkpoint.TrainingState(tmp_path / "s", {"job": 1}).latest.epoch == 1


def test_state_of_another_job_is_discarded_and_settings_are_kept(tmp_path):
    state = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    assert state.keep("threads", 2) == 2
    _seal(state, 1, 1)
    resumed = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    assert resumed.keep("threads", 1) == 2  # a resumed job keeps its thread count
    other = checkpoint.TrainingState(tmp_path / "s", {"job": 2})
    assert other.latest is None and other.keep("threads", 1) == 1


def test_removal_survives_a_kill_halfway(tmp_path):
    state = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    _seal(state, 1, 1)
    leftover = tmp_path / "s.deleting-4242"  # a removal killed after its rename
    (leftover / "p1-e0001").mkdir(parents=True)
    state.remove()
    assert not (tmp_path / "s").exists()
    fresh = checkpoint.TrainingState(tmp_path / "s", {"job": 1})
    assert fresh.latest is None and not leftover.exists()


# ---- random layers and weight averages ----------------------------------------------------


def test_random_layer_states_depend_on_seed_and_epoch_only(ladder_specs):
    from cnnstudy import models

    model = models.build_model(ladder_specs["model_10"])  # translation, rotation, 2 Dropout layers
    states = training.seed_states(model)
    assert len(states) == 4
    callback = training.EpochSeeds(seed=3)
    callback.set_model(model)
    callback.on_epoch_begin(4)
    first = [keras.ops.convert_to_numpy(s).tolist() for s in states]
    for state in states:  # what a process that already ran other epochs would hold
        state.assign(np.array([123, 456]).astype(state.dtype))
    callback.on_epoch_begin(4)
    assert [keras.ops.convert_to_numpy(s).tolist() for s in states] == first
    callback.on_epoch_begin(5)
    assert [keras.ops.convert_to_numpy(s).tolist() for s in states] != first
    assert len({tuple(f) for f in first}) == 4  # each layer its own stream


def test_evaluated_weights_swap_in_the_average_and_restore_exactly():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(0.1, use_ema=True, ema_momentum=0.5), loss="mse")
    for _ in range(3):  # train_on_batch: no end of fit, so the averages are not copied into the weights
        model.train_on_batch(np.ones((8, 3), "float32"), np.zeros((8, 2), "float32"))
    # Fails loudly if Keras renames the private attributes the averages live in.
    pairs = predict.ema_pairs(model.optimizer)
    assert len(pairs) == 2
    raw = [v.numpy().copy() for v, _ in pairs]
    averages = [a.numpy().copy() for _, a in pairs]
    assert not all(np.array_equal(r, a) for r, a in zip(raw, averages, strict=True))
    with predict.evaluated_weights(model):
        assert all(np.array_equal(v.numpy(), a) for (v, _), a in zip(pairs, averages, strict=True))
    assert all(np.array_equal(v.numpy(), r) for (v, _), r in zip(pairs, raw, strict=True))
    assert predict.ema_pairs(keras.optimizers.SGD()) == []


# ---- the resume matrix --------------------------------------------------------------------


def _kinds(ladder_specs):
    """Each kind of entry's spec: "early stopping" and "EMA + schedule" are conftest.SHARED_RUNS,
    whose uninterrupted runs are trained once for three files."""
    return {
        "plain": entry_with(ladder_specs, "model_03", epochs=4, batch_size=64),
        "two-phase": entry_with(
            ladder_specs,
            "model_13",
            epochs=2,
            batch_size=64,
            backbone={"weights": "none", "fine_tune": {"unfreeze": "all", "epochs": 2, "learning_rate": 1e-5}},
        ),
        **{kind: entry_with(ladder_specs, name, **changes) for kind, (name, changes) in SHARED_RUNS.items()},
    }


def _outs(root: Path) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    return {
        "model_out": str(root / "model.keras"),
        "history_out": str(root / "history.csv"),
        "info_out": str(root / "train_info.json"),
        "state_dir": str(root / "state"),
    }


# The matrix runs as early work (conftest.early), beside the tests before this file: at a lower CPU
# priority, and with the time limit of such work (conftest.until_session_end).
NICE = ("nice", "-n", "15")


def _cli(data, spec_file, outs) -> list[str]:
    return [*NICE, *train_cli(data, spec_file, Path(outs["model_out"]).parent, seed=1)]


def _train(data, spec_file, outs) -> str:
    """One uninterrupted training process (one thread); its log."""
    proc = subprocess.run(_cli(data, spec_file, outs), capture_output=True, text=True, timeout=until_session_end())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stderr


def _kill_and_rerun(data, spec_file, outs, point: str, epoch: int | None) -> str:
    """Kill a training job at ``point`` (after checkpoint ``epoch``, mid-way through the next one,
    as a preemption would; None: after training, before its outputs), then rerun it; the rerun's log."""
    if epoch is None:
        # Training ends, then the job dies before its outputs exist: here the model cannot be
        # moved into place (a folder stands at its path), which leaves the state exactly as
        # such a kill would.
        Path(outs["model_out"]).mkdir()
        proc = subprocess.run(_cli(data, spec_file, outs), capture_output=True, text=True, timeout=until_session_end())
        assert proc.returncode != 0 and saved_epoch(Path(outs["state_dir"])) > 0, proc.stderr[-2000:]
        Path(outs["model_out"]).rmdir()
    else:
        with open(Path(outs["state_dir"]).parent / "killed.log", "w") as log:
            proc = subprocess.Popen(_cli(data, spec_file, outs), stdout=log, stderr=subprocess.STDOUT)
        wait_for_epoch(Path(outs["state_dir"]), epoch, proc, timeout=until_session_end())
        assert proc.poll() is None, (
            f"the job ended (exit {proc.returncode}) before its kill after checkpoint {epoch}: kill earlier"
        )
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        assert saved_epoch(Path(outs["state_dir"])) >= epoch and not Path(outs["model_out"]).exists()
    if "truncated" in point:
        newest = max(Path(outs["state_dir"]).glob("p*-e*"))
        with open(newest / "model.weights.h5", "r+b") as fh:
            fh.truncate(1000)
    return _train(data, spec_file, outs)


def _evaluate(data, outs, tta, root: Path) -> dict:
    """The run's val and test metrics, evaluate.py's files written into ``root``."""
    root.mkdir(exist_ok=True)
    metrics = evaluate.main(
        str(data),
        str(data.with_suffix(".json")),
        outs["model_out"],
        outs["history_out"],
        outs["info_out"],
        str(root / "metrics.json"),
        str(root / "probs.npz"),
        tta=tta,
    )
    return {split: metrics[split] for split in ("val", "test")}


_REFERENCE_METRICS: dict[str, dict] = {}  # each reference run evaluated once, for all its cases


def assert_identical(data, reference: dict, resumed: dict, tta: str) -> None:
    columns = lambda h: h.drop(columns=list(training.TIMING_COLUMNS))  # noqa: E731
    expected, got = pd.read_csv(reference["history_out"]), pd.read_csv(resumed["history_out"])
    pd.testing.assert_frame_equal(columns(got), columns(expected), check_exact=True)
    info = [json.loads(Path(o["info_out"]).read_text()) for o in (reference, resumed)]
    assert info[1]["kept_epoch"] == info[0]["kept_epoch"] and info[1]["stopped_early"] == info[0]["stopped_early"]
    weights = [keras.saving.load_model(o["model_out"]).get_weights() for o in (reference, resumed)]
    assert len(weights[0]) == len(weights[1])
    assert all(np.array_equal(a, b) for a, b in zip(*weights, strict=True)), "saved weights differ"
    if reference["model_out"] not in _REFERENCE_METRICS:
        evaluated = Path(resumed["model_out"]).parent / "reference-evaluated"
        _REFERENCE_METRICS[reference["model_out"]] = _evaluate(data, reference, tta, evaluated)
    assert (
        _evaluate(data, resumed, tta, Path(resumed["model_out"]).parent) == _REFERENCE_METRICS[reference["model_out"]]
    )
    assert not Path(resumed["state_dir"]).exists()


MATRIX = [
    ("plain", "after epoch 2, mid-epoch 3", 2),
    ("early stopping", "after epoch 2, mid-epoch 3", 2),
    # Checkpoint 2, not 3: where the run stops depends on the CPU kind (with patience 1 it ran
    # to epoch 3 on an Intel Xeon, further on AMD EPYC), and a kill must come before the end.
    ("early stopping", "while writing checkpoint 2 (newest truncated)", 2),
    ("early stopping", "after the stop, before the outputs", None),
    ("two-phase", "in phase 2, after epoch 3", 3),
    ("EMA + schedule", "after epoch 1, mid-epoch 2", 1),
    ("EMA + schedule", "after the last epoch, before the outputs", None),
]


@early("matrix", needs=("tiny_data", "shared_runs"))
def _matrix(tmp_path_factory, started) -> dict:
    """Each kind of entry trained once uninterrupted (the reference; for the kinds of
    conftest.SHARED_RUNS, the shared runs), and every case of the matrix killed and rerun:
    one-thread processes, two tasks at a time, begun as the session starts.
    Key -> (spec file, outputs, Future)."""
    ladder_specs = load_ladder()
    tiny_data = started["tiny_data"].result()
    root = tmp_path_factory.mktemp("resume")
    runs, tasks = {}, {}
    for kind, spec in _kinds(ladder_specs).items():
        spec_file = root / f"{kind}.json"
        spec_file.write_text(json.dumps(spec))
        runs[kind] = spec_file, None if kind in SHARED_RUNS else _outs(root / kind.replace(" ", "_"))
        if kind not in SHARED_RUNS:
            tasks[kind] = functools.partial(_train, tiny_data, *runs[kind])
    for i, (kind, point, epoch) in enumerate(MATRIX):
        runs[kind, point] = runs[kind][0], _outs(root / f"case_{i}")
        tasks[kind, point] = functools.partial(_kill_and_rerun, tiny_data, *runs[kind, point], point, epoch)
    futures = two_at_a_time(tasks)
    names = {
        "model_out": "model.keras",
        "history_out": "history.csv",
        "info_out": "train_info.json",
        "state_dir": "state",
    }
    for kind, (spec, out) in started["shared_runs"].result().items():  # their references, trained once
        assert json.loads(runs[kind][0].read_text()) == spec
        runs[kind] = runs[kind][0], {key: str(out / name) for key, name in names.items()}
        futures[kind] = started["shared_runs"]
    return {key: (*run, futures[key]) for key, run in runs.items()}


@pytest.fixture(scope="module")
def matrix(started_early) -> dict:
    return started_early["matrix"].result()


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "point", "epoch"), MATRIX, ids=[f"{k}: {p}" for k, p, _ in MATRIX])
def test_a_killed_job_resumes_bit_identically(kind, point, epoch, matrix, tiny_data):
    spec_file, reference, done = matrix[kind]
    done.result()
    _, outs, rerun = matrix[kind, point]
    log = rerun.result()
    assert "resuming after epoch" in log
    if "truncated" in point:
        assert "is unreadable" in log and "set aside" in log
    reference_info = json.loads(Path(reference["info_out"]).read_text())
    if kind == "early stopping":
        assert reference_info["stopped_early"], "the reference run must stop early for this case to mean anything"
    if kind == "two-phase":  # two-phase fine-tuning itself: phase 2 trains the whole VGG16 at its own rate
        history = pd.read_csv(reference["history_out"])
        assert history["epoch"].tolist() == [1, 2, 3, 4] and history["phase"].tolist() == [1, 1, 2, 2]
        assert history["learning_rate"].tolist() == pytest.approx([1e-3, 1e-3, 1e-5, 1e-5])
        assert reference_info["epochs_requested"] == 4 and reference_info["trainable_params"] > 14_000_000
    assert_identical(tiny_data, reference, outs, json.loads(spec_file.read_text()).get("tta", "none"))


@pytest.mark.slow
def test_same_seed_same_run_other_seed_other_run(tiny_data, ladder_specs, tmp_path):
    spec = entry_with(ladder_specs, "model_09", epochs=2, batch_size=64)  # shuffle, augmentation, dropout
    runs = {}
    for label, seed in (("a", 0), ("b", 0), ("c", 1)):
        outs = _outs(tmp_path / label)
        train.main(str(tiny_data), spec, **outs, seed=seed, threads=2)
        runs[label] = pd.read_csv(outs["history_out"]).drop(columns=list(training.TIMING_COLUMNS))
    pd.testing.assert_frame_equal(runs["a"], runs["b"], check_exact=True)
    assert not runs["a"]["loss"].equals(runs["c"]["loss"])
