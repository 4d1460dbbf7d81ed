"""Refactoring changes no number: the current code trains and evaluates bit-identically to a
reference commit's code (same entry, seed and data), over several epochs of an early-stopping
entry and of model_17 (reshuffles, an early stop, a schedule, EMA, TTA).

The reference code is taken from git (the last commit before the refactoring of the entry
handling and the training job). A change that is meant to alter the numerics moves REFERENCE
to the commit that makes it, and says so; the published study results (make verify-published,
test_verify_published.py) must then be regenerated too.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile

import pandas as pd
import pytest

from conftest import (
    REPO,
    SHARED_RUNS,
    early,
    entry_with,
    load_ladder,
    missing,
    side_by_side,
    train_cli,
    until_session_end,
)

REFERENCE = "5720dab6827194fc4c0e9908a95f1c695a8d2ef4"
TIMING = ["epoch_time", "images_per_s"]
# The runs are early work (conftest.early), beside the tests before this file: a lower CPU priority,
# but the highest of the early work's, as this file comes soon (at nice 15 the session waited 3 min for them).
NICE = ["nice", "-n", "5"]
# The current code's side is trained once for three files (conftest.SHARED_RUNS: an early-stopping
# entry and model_17, seed 1).
CASES = SHARED_RUNS


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


def _evaluate(sides: dict, outs: dict, data, root, tta) -> dict:
    """Evaluate each side's model with its own code (name -> its workflow_scripts), side by side
    in processes of their own with one thread each; each side's history and metrics."""
    side_by_side(
        {
            name: [
                *NICE,
                sys.executable,
                str(scripts / "evaluate.py"),
                "--data",
                str(data),
                "--manifest",
                str(data.with_suffix(".json")),
                "--model",
                str(outs[name] / "model.keras"),
                "--history",
                str(outs[name] / "history.csv"),
                "--train-info",
                str(outs[name] / "train_info.json"),
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
        timeout=until_session_end(),
    )
    results = {}
    for name in sides:
        metrics = json.loads((root / name / "metrics.json").read_text())
        history = pd.read_csv(outs[name] / "history.csv").drop(columns=TIMING)
        results[name] = history, {k: metrics[k] for k in ("test", "val", "kept_epoch", "epochs_run", "stopped_early")}
    return results


@early("equivalence_runs", needs=("tiny_data", "shared_runs"))
def _equivalence_runs(tmp_path_factory, started) -> dict:
    """Each case trained by the reference code here, beside the current code's training of it
    (conftest.shared_runs, seed 1, one thread each), begun as the session starts; then both sides
    evaluated, each by its own code. Case -> {side: (history, metrics)}."""
    tiny_data = started["tiny_data"].result()
    root = tmp_path_factory.mktemp("equivalence")
    reference = _reference_code(root)
    before = {}
    for kind, (name, changes) in CASES.items():
        before[kind] = root / kind.replace(" ", "_").replace("+", "and") / "before"
        before[kind].mkdir(parents=True)
        (before[kind] / "spec.json").write_text(json.dumps(entry_with(load_ladder(), name, **changes)))
    side_by_side(
        {
            kind: [*NICE, *train_cli(tiny_data, out / "spec.json", out, seed=1, scripts=reference)]
            for kind, out in before.items()
        },
        root / "train-logs",
        timeout=until_session_end(),
    )
    shared = started["shared_runs"].result()
    runs = {}
    for kind, out in before.items():
        spec, after = shared[kind]
        assert json.loads((out / "spec.json").read_text()) == spec, "both sides train the same spec"
        sides = {"before": reference, "after": REPO / "workflow_scripts"}
        runs[kind] = _evaluate(sides, {"before": out, "after": after}, tiny_data, out.parent, spec.get("tta", "none"))
    return runs


@pytest.fixture(scope="module")
def equivalence_runs(started_early) -> dict:
    return started_early["equivalence_runs"].result()


@pytest.mark.slow
@pytest.mark.parametrize("name", CASES)
def test_current_code_matches_the_reference_commit(name, equivalence_runs):
    before, after = equivalence_runs[name]["before"], equivalence_runs[name]["after"]
    pd.testing.assert_frame_equal(after[0], before[0], check_exact=True)
    assert after[1] == before[1]
