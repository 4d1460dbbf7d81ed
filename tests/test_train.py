"""Training and evaluation jobs through their main() (and their command line where what a process loads is checked)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import evaluate
import keras
import numpy as np
import pandas as pd
import pytest
import train

from cnnstudy.errors import JobError

from conftest import SCRIPTS, saved_epoch


def _spec(ladder_specs, name, **changes):
    spec = copy.deepcopy(ladder_specs[name])
    spec.update(changes)
    return spec


def _outputs(root):
    return {k: str(root / f) for k, f in (("model_out", "m.keras"), ("history_out", "h.csv"), ("info_out", "i.json"))}


def test_train_then_evaluate(tiny_data, ladder_specs, tmp_path):
    spec = _spec(ladder_specs, "model_10", epochs=2, batch_size=64)
    out = _outputs(tmp_path)
    info = train.main(str(tiny_data), spec, **out, state_dir=str(tmp_path / "state"), seed=3, threads=2)
    assert not (tmp_path / "state").exists()  # removed once the outputs are written
    history = pd.read_csv(out["history_out"])
    assert history["epoch"].tolist() == [1, 2]
    assert {"loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "epoch_time", "images_per_s"} <= set(
        history
    )
    assert history["learning_rate"].iloc[0] == pytest.approx(0.001)
    assert info["epochs_run"] == 2 and info["seed"] == 3 and info["n_train"] == 400
    assert info["precision"] in ("float32", "mixed_bfloat16") and info["device"]["kind"] == "CPU"

    metrics_out, probs_out = tmp_path / "metrics.json", tmp_path / "probs.npz"
    result = evaluate.main(
        str(tiny_data),
        str(tiny_data.with_suffix(".json")),
        out["model_out"],
        out["history_out"],
        out["info_out"],
        str(metrics_out),
        str(probs_out),
    )
    saved = json.loads(metrics_out.read_text())
    probs = np.load(probs_out)
    assert probs["probs"].shape == (200, 10) and np.allclose(probs["probs"].sum(1), 1, atol=1e-5)
    accuracy = float((probs["probs"].argmax(1) == probs["labels"]).mean())
    assert saved["test"]["accuracy"] == pytest.approx(accuracy)
    assert np.array(saved["test"]["confusion_matrix"]).sum() == 200
    assert len(saved["test"]["per_class"]) == 10 and 0 <= saved["test"]["f1_macro"] <= 1
    assert saved["kept_epoch"]["epoch"] in (1, 2) and saved["epochs_run"] == 2
    assert saved["params"] == result["params"] > 0
    prov = saved["provenance"]
    assert prov["training"]["packages"]["tensorflow"] and prov["seed"] == 3 and prov["data"]["npz_md5"]
    assert prov["spec_hash"] == info["spec_hash"]
    assert saved["val"]["accuracy"] == pytest.approx(
        history["val_accuracy"].iloc[saved["kept_epoch"]["epoch"] - 1], abs=0.011
    )
    assert saved["kept_epoch"]["cross_entropy"] > 0 and "per_class" not in saved["val"]


def test_nan_loss_fails_the_job_clearly(tiny_data, ladder_specs, tmp_path):
    spec = _spec(ladder_specs, "model_01", epochs=3, optimizer={"name": "sgd", "learning_rate": 1e12})
    out = _outputs(tmp_path)
    with pytest.raises(JobError, match=r"model_01 seed 0: training diverged \(NaN or Inf loss .*no model was written"):
        train.main(str(tiny_data), spec, **out, state_dir=str(tmp_path / "state"), threads=2, precision="float32")
    assert not any(os.path.exists(path) for path in out.values())


def test_state_of_a_different_job_is_discarded(tiny_data, ladder_specs, tmp_path):
    spec = _spec(ladder_specs, "model_01", epochs=1)
    state = tmp_path / "state"
    (state / "p1-e0007").mkdir(parents=True)
    (state / "job.json").write_text(json.dumps({"job": {"spec_hash": "something else"}, "settings": {}}))
    (state / "p1-e0007" / "state.json").write_text(json.dumps({"epoch": 7, "phase": 1, "files": {}, "history": []}))
    info = train.main(str(tiny_data), spec, **_outputs(tmp_path), state_dir=str(state), threads=2)
    assert info["resumed_from_epoch"] == 0 and info["epochs_run"] == 1


def test_missing_data_is_named(ladder_specs, tmp_path):
    with pytest.raises(FileNotFoundError, match="training data not found: .*nope.npz"):
        train.main(
            str(tmp_path / "nope.npz"), ladder_specs["model_01"], **_outputs(tmp_path), state_dir=str(tmp_path / "s")
        )


def test_a_job_that_must_have_a_gpu_fails_at_once_without_one(tiny_data, ladder_specs, tmp_path):
    out = _outputs(tmp_path)
    with pytest.raises(JobError, match=r"require_gpu is true but TensorFlow sees no GPU .*make run GPU=1"):
        train.main(str(tiny_data), ladder_specs["model_01"], **out, state_dir=str(tmp_path / "s"), require_gpu="true")
    assert not any(os.path.exists(path) for path in out.values())
    assert saved_epoch(tmp_path / "s") == 0  # no epoch trained


def test_training_records_its_code(tiny_data, ladder_specs, tmp_path):
    from cnnstudy import provenance

    info = train.main(
        str(tiny_data), _spec(ladder_specs, "model_01", epochs=1), **_outputs(tmp_path), state_dir=str(tmp_path / "s")
    )
    recorded = info["provenance"]
    assert recorded["code_hash"] == provenance.code_hash("train.py") and len(recorded["code_hash"]) == 16
    assert recorded["git_commit"] and len(recorded["git_commit"]) == 40 and isinstance(recorded["git_dirty"], bool)
    assert recorded["packages"]["keras"] == keras.__version__


LOADED = """
import atexit, os, sys

@atexit.register
def _loaded():
    with open(os.environ["LOADED_LOG"], "w") as fh:
        fh.write(" ".join(sorted(name for name in ("tensorflow", "jax", "sklearn", "matplotlib") if sys.modules.get(name))))
"""


def test_jobs_refuse_the_packages_tensorflow_would_import_for_nothing(tiny_data, ladder_specs, tmp_path):
    """A training job never imports jax, scikit-learn or matplotlib, which TensorFlow and Keras would
    load at start-up (seconds per job); an evaluation job imports scikit-learn for its metrics only."""
    (tmp_path / "hook").mkdir()
    (tmp_path / "hook" / "sitecustomize.py").write_text(LOADED)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "hook"), os.environ.get("PYTHONPATH", "")])}
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(_spec(ladder_specs, "model_01", epochs=1, batch_size=100)))
    out = _outputs(tmp_path)
    jobs = {
        "train": [
            "train.py",
            "--data",
            str(tiny_data),
            "--spec",
            str(spec),
            "--threads",
            "1",
            "--state-dir",
            str(tmp_path / "s"),
            *(f"--{k.replace('_', '-')}={v}" for k, v in out.items()),
        ],
        "evaluate": [
            "evaluate.py",
            "--data",
            str(tiny_data),
            "--manifest",
            str(tiny_data.with_suffix(".json")),
            "--model",
            out["model_out"],
            "--history",
            out["history_out"],
            "--train-info",
            out["info_out"],
            "--metrics-out",
            str(tmp_path / "metrics.json"),
            "--probs-out",
            str(tmp_path / "probs.npz"),
        ],
    }
    loaded = {}
    for job, (script, *args) in jobs.items():
        log = tmp_path / f"{job}.loaded"
        proc = subprocess.run(
            [sys.executable, str(SCRIPTS / script), *args],
            env={**env, "LOADED_LOG": str(log)},
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        loaded[job] = log.read_text().split()
    assert loaded == {"train": ["tensorflow"], "evaluate": ["sklearn", "tensorflow"]}
