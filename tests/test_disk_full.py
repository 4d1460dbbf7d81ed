"""A training job whose filesystem fills: a clear error, nothing half-written, an exact resume.

The job's outputs and training state live on a small tmpfs this test mounts (root, as in CI),
sized from a real checkpoint of model_01 so that it fills mid-run; the job's log is on another
filesystem, so the message is seen. Once the tmpfs is grown the same command resumes from the
last sealed checkpoint and must give the uninterrupted run's history and weights, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from conftest import SCRIPTS, missing, saved_epoch, saved_weights, train_cli

TIMING = ["epoch_time", "images_per_s"]


@pytest.fixture()
def small_fs(tmp_path):
    if os.geteuid() != 0:
        missing("mounting a tmpfs needs root (CI runs as root)")
    mount = tmp_path / "small"
    mount.mkdir()
    mounted = []

    def make(size: int) -> Path:
        action = ["-o", f"remount,size={size}"] if mounted else ["-t", "tmpfs", "-o", f"size={size}", "tmpfs"]
        subprocess.run(["mount", *action, str(mount)], check=True)
        mounted.append(True)
        return mount

    yield make
    if mounted:
        subprocess.run(["umount", str(mount)], check=False)


def _spec(ladder_specs, epochs: int) -> dict:
    from cnnstudy import configuration

    return {**configuration.training_part(ladder_specs["model_01"]), "epochs": epochs}


def _train(tiny_data: Path, spec: Path, out: Path, state: Path, log: Path) -> subprocess.CompletedProcess:
    """The train script as its rule runs it, its log redirected like the rule's."""
    with open(log, "w") as fh:
        cmd = train_cli(tiny_data, spec, out, seed=0, state=state)
        return subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=600, cwd=SCRIPTS)


def _outputs_left(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_file()) if out.is_dir() else []


@pytest.mark.slow
@pytest.mark.parametrize("epochs, fills_during", [(4, "checkpoint"), (2, "output")])
def test_a_full_disk_fails_clearly_keeps_the_last_checkpoint_and_resumes_exactly(
    tmp_path, tiny_data, ladder_specs, small_fs, epochs, fills_during
):
    spec = tmp_path / "model_01.json"
    spec.write_text(json.dumps(_spec(ladder_specs, epochs)))
    reference = tmp_path / "reference"
    assert _train(tiny_data, spec, reference, tmp_path / "ref-state", tmp_path / "ref.log").returncode == 0
    checkpoint = (reference / "model.keras").stat().st_size  # ~ one checkpoint (weights; SGD keeps no slots)
    # Two sealed checkpoints fit; the third (4 epochs) or the model output after two (2 epochs) does not.
    mount = small_fs(int(2.5 * checkpoint))
    out, state, log = mount / "out", mount / "state", tmp_path / "job.log"

    failed = _train(tiny_data, spec, out, state, log)
    text = log.read_text()
    assert failed.returncode == 1, text[-3000:]
    assert "the disk is full" in text and str(mount) in text, text[-3000:]
    assert ("the checkpoint of epoch 3" in text) if fills_during == "checkpoint" else ("the trained model" in text), (
        text[-2000:]
    )
    assert "Traceback" not in text, "a full disk is an expected failure: one clear line, no traceback"
    assert _outputs_left(out) == [], f"half-written outputs left: {_outputs_left(out)}"
    assert saved_epoch(state) == 2, "the last sealed checkpoint must be kept"
    assert not list(state.glob(".tmp-*")), "the unsealed checkpoint must be removed"

    small_fs(8 * checkpoint)  # space freed
    resumed = _train(tiny_data, spec, out, state, log)
    assert resumed.returncode == 0, log.read_text()[-3000:]
    assert "resuming after epoch 2" in log.read_text()
    got, expected = (pd.read_csv(d / "history.csv").drop(columns=TIMING) for d in (out, reference))
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    for a, b in zip(saved_weights(out / "model.keras"), saved_weights(reference / "model.keras"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert not state.exists(), "a finished job removes its training state"
