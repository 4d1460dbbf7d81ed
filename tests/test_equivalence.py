"""Refactoring changes no number: the current code trains and evaluates bit-identically to a
reference commit's code (same entry, seed and data), over several epochs of an early-stopping
entry and of model_17 (reshuffles, an early stop, a schedule, EMA, TTA).

The reference code is taken from git (the last commit before the refactoring of the entry
handling and the training job). A change that is meant to alter the numerics moves REFERENCE
to the commit that makes it, and says so; the published study results (make verify-published,
test_verify_published.py) must then be regenerated too.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from conftest import REPO, missing, side_by_side

REFERENCE = "5720dab6827194fc4c0e9908a95f1c695a8d2ef4"
TIMING = ["epoch_time", "images_per_s"]


def _reference_code(root):
    """workflow_scripts/ of the REFERENCE commit, extracted under ``root``."""
    archive = root / "reference.tar"
    proc = subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), REFERENCE, "workflow_scripts"],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        missing(f"git cannot give the reference commit {REFERENCE[:12]} (shallow clone?): {proc.stderr.strip()}")
    with tarfile.open(archive) as tar:
        tar.extractall(root / "reference", filter="data")
    return root / "reference" / "workflow_scripts"


def _train_and_evaluate(sides: dict, data, spec, root, tta) -> dict:
    """Train, then evaluate, each side's code (name -> its workflow_scripts) in processes of their
    own, the sides side by side with one thread each; return each side's history and metrics."""
    files = {}
    for name in sides:
        out = root / name
        out.mkdir(parents=True)
        (out / "spec.json").write_text(json.dumps(spec))
        files[name] = {k: str(out / v) for k, v in (("model", "m.keras"), ("history", "h.csv"), ("info", "i.json"))}
    side_by_side(
        {
            name: [
                sys.executable,
                str(scripts / "train.py"),
                "--data",
                str(data),
                "--spec",
                str(root / name / "spec.json"),
                "--model-out",
                files[name]["model"],
                "--history-out",
                files[name]["history"],
                "--info-out",
                files[name]["info"],
                "--state-dir",
                str(root / name / "state"),
                "--seed",
                "2",
                "--threads",
                "1",
            ]
            for name, scripts in sides.items()
        },
        root / "train-logs",
    )
    side_by_side(
        {
            name: [
                sys.executable,
                str(scripts / "evaluate.py"),
                "--data",
                str(data),
                "--manifest",
                str(data.with_suffix(".json")),
                "--model",
                files[name]["model"],
                "--history",
                files[name]["history"],
                "--train-info",
                files[name]["info"],
                "--metrics-out",
                str(root / name / "metrics.json"),
                "--probs-out",
                str(root / name / "probs.npz"),
                "--tta",
                tta,
                "--threads",
                "1",
            ]
            for name, scripts in sides.items()
        },
        root / "evaluate-logs",
    )
    results = {}
    for name in sides:
        metrics = json.loads((root / name / "metrics.json").read_text())
        history = pd.read_csv(files[name]["history"]).drop(columns=TIMING)
        results[name] = history, {k: metrics[k] for k in ("test", "val", "kept_epoch", "epochs_run", "stopped_early")}
    return results


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "changes"),
    [
        ("model_06", {"epochs": 6, "batch_size": 64, "early_stopping": {"patience": 1, "min_delta": 0.02}}),
        ("model_17", {"epochs": 4, "batch_size": 100, "time_to_accuracy": True, "optimizer": {"ema_momentum": 0.5}}),
    ],
)
def test_current_code_matches_the_reference_commit(name, changes, ladder_specs, tiny_data, tmp_path):
    reference = _reference_code(tmp_path)
    spec = copy.deepcopy(ladder_specs[name])
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    runs = _train_and_evaluate(
        {"before": reference, "after": REPO / "workflow_scripts"}, tiny_data, spec, tmp_path, spec.get("tta", "none")
    )
    before, after = runs["before"], runs["after"]
    pd.testing.assert_frame_equal(after[0], before[0], check_exact=True)
    assert after[1] == before[1]
