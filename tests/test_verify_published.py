"""The published study stays true to the code: `make verify-published` (rules/verify.smk).

CI's selection retrains, on the full data, through the workflow, with the thread count and
precision each run recorded: model_09's first epoch (BatchNorm, dropout, Keras' random
translation and rotation, Adam) and model_17's (its schedule over 14 epochs, weight EMA, the
evaluated accuracy with flip-and-translate TTA after the epoch), side by side, begun as the
session starts at the lowest CPU priority (conftest.early).
Every history value but timing must equal the published one. If this fails after a change to
training code, the change altered the numerics: regenerate what was published.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, early, require_mirror, snakemake, two_at_a_time

PUBLISHED = REPO / "reports" / "study"
CI_SELECTION = ["model_09_seed0", "model_17_seed0"]


def verify(work, published, runs, epochs, check=True, *extra):
    """`snakemake verify_published` at nice 19 (it starts early: conftest.early)."""
    config = f"verify={{published: {published}, runs: [{', '.join(runs)}], epochs: {epochs}}}"
    return snakemake("verify_published", "--directory", str(work), "--cores", "2", "--show-failed-logs", *extra,
                     "--config", f"data_source={require_mirror()}", config, check=check, timeout=2400, nice=19)  # fmt: skip


def _altered_study(published: Path) -> Path:
    """model_01 seed 0 with one published value changed; the same run filed as seed 1 with another
    CPU recorded."""
    for sub in ("metrics", "histories"):
        (published / sub).mkdir(parents=True)
    history = pd.read_csv(PUBLISHED / "histories" / "model_01_seed0.csv")
    history.loc[0, "val_loss"] += 1e-6
    history.to_csv(published / "histories" / "model_01_seed0.csv", index=False)
    shutil.copy(published / "histories" / "model_01_seed0.csv", published / "histories" / "model_01_seed1.csv")
    metrics = json.loads((PUBLISHED / "metrics" / "model_01_seed0.json").read_text())
    (published / "metrics" / "model_01_seed0.json").write_text(json.dumps(metrics))
    metrics["seed"], metrics["provenance"]["device"]["name"] = 1, "Another CPU 9000"
    (published / "metrics" / "model_01_seed1.json").write_text(json.dumps(metrics))
    return published


def _link_data(src: str, dst: str) -> None:
    """Hard-link the data files (read-only to the jobs), copy Snakemake's records (rewritten in place)."""
    if f"{os.sep}.snakemake{os.sep}" in src:
        shutil.copy2(src, dst)
    else:
        os.link(src, dst)


@early("verify_checks", needs=("full_data",))
def _verify_checks(tmp_path_factory, started) -> dict:
    """This file's two verify runs, begun as the session starts (conftest.early) and side by side:
    CI's selection, and model_01 against the altered study in a second working directory (the
    data hard-linked). Name -> (working directory, Future of the finished snakemake)."""
    full_data = started["full_data"].result()
    altered = _altered_study(tmp_path_factory.mktemp("altered") / "study")
    work = tmp_path_factory.mktemp("full_data_altered")
    shutil.copytree(full_data, work, symlinks=True, dirs_exist_ok=True, copy_function=_link_data)
    runs = {"ci": (full_data, PUBLISHED, CI_SELECTION, 1), "altered": (work, altered, ["model_01_seed0", "model_01_seed1"], 1, False, "--keep-going")}
    futures = two_at_a_time({name: functools.partial(verify, *args) for name, args in runs.items()})
    return {name: (runs[name][0], futures[name]) for name in runs}


@pytest.fixture(scope="module")
def verify_checks(started_early) -> dict:
    return started_early["verify_checks"].result()


@pytest.fixture(scope="module")
def ci_selection(verify_checks):
    work, done = verify_checks["ci"]
    done.result()
    return {run: json.loads((work / "results" / "verify" / run.replace("_seed", "/seed_") / "epochs_1.json").read_text())
            for run in CI_SELECTION}  # fmt: skip


@pytest.mark.slow
def test_the_ci_selection_of_published_runs_is_reproduced(ci_selection):
    from cnnstudy import provenance

    for run, check in ci_selection.items():
        assert check["verdict"] == "identical" and check["epochs"] == "1-1", run
        assert check["code_hashes"]["training"] == provenance.code_hash("train.py")
        recorded = json.loads((PUBLISHED / "metrics" / f"{run}.json").read_text())["provenance"]
        assert check["threads"] == recorded["threads"]["intra_op"] and check["precision"] == recorded["precision"]


@pytest.mark.slow
def test_an_altered_published_row_fails_naming_run_epoch_and_column(verify_checks):
    """model_01 seed 0 with one published value changed: "code changed", with run, epoch and column.
    The same run filed as seed 1 with another CPU recorded: "machine differs", never "code changed"."""
    work, done = verify_checks["altered"]
    proc = done.result()
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "model_01 seed 0: code changed: epoch 1, column val_loss: published" in out, out[-4000:]
    assert "model_01 seed 1: machine differs" in out and "Another CPU 9000" in out, out[-4000:]
    assert "model_01 seed 1: code changed" not in out
    assert not list((work / "results" / "verify" / "model_01").rglob("epochs_1.json")), "a failed check records nothing"


@pytest.mark.slow
def test_recorded_checks_clear_the_mark_of_the_runs_they_verified(ci_selection, tmp_path):
    """`verify_published.py record` then `publish.py --refresh`, on a copy of reports/study whose
    earlier checks are removed: the verified runs lose their †, every other run (trained by other
    code, unchecked) keeps it, and an entry keeps it while any of its seeds is unchecked."""
    import publish
    import verify_published

    from cnnstudy.errors import JobError

    study = tmp_path / "study"
    shutil.copytree(PUBLISHED, study)
    for path in (study / "metrics").glob("*.json"):  # undo the published checks: as trained
        metrics = json.loads(path.read_text())
        metrics["provenance"].pop("verified", None)
        for stage in ("training", "evaluation"):
            block = metrics["provenance"][stage]
            block.update(block.pop("original", {}))
            block.pop("attributed", None)
        path.write_text(json.dumps(metrics))
    checks = []
    for run, check in ci_selection.items():
        path = tmp_path / f"{run}.json"
        path.write_text(json.dumps({**check, "dirty": True}))
        with pytest.raises(JobError, match="uncommitted changes"):
            verify_published.record(str(study), [str(path)])
        path.write_text(json.dumps({**check, "dirty": False}))  # as from a clean checkout (CI's clone)
        checks.append(str(path))
    # A check of two epochs (its record shaped as the job writes it) also re-attributes the run.
    two = tmp_path / "model_10_seed1.json"
    two.write_text(json.dumps({**ci_selection["model_09_seed0"], "model": "model_10", "seed": 1, "epochs": "1-2", "dirty": False}))
    original = json.loads((study / "metrics" / "model_10_seed1.json").read_text())["provenance"]["training"]
    verify_published.record(str(study), [*checks, str(two)])
    publish.refresh(str(study))

    commit = ci_selection["model_09_seed0"]["commit"]
    prov = pd.read_csv(study / "tables" / "provenance.csv", keep_default_na=False).set_index(["Model", "Seed"])
    assert prov.loc[("model_09", 0), "Code now"] == "verified" and prov.loc[("model_17", 0), "Code now"] == "verified"
    assert commit[:12] in prov.loc[("model_09", 0), "Verified at commit"]
    assert prov.loc[("model_09", 0), "Reproduced at commit"] == "", "one epoch compared: recorded, not re-attributed"
    attributed = json.loads((study / "metrics" / "model_10_seed1.json").read_text())["provenance"]["training"]
    assert attributed["git_commit"] == commit and attributed["original"]["git_commit"] == original["git_commit"]
    assert attributed["original"]["code_hash"] == original["code_hash"]
    assert prov.loc[("model_10", 1), "Reproduced at commit"] == commit[:12]
    assert prov.loc[("model_10", 1), "Trained at commit"] == original["git_commit"][:12]
    assert prov.loc[("model_10", 1), "Code now"] == "verified"
    unchecked = prov.drop(index=[("model_09", 0), ("model_17", 0), ("model_10", 1)])
    assert (unchecked["Code now"] == "differs †").all(), unchecked["Code now"].to_dict()
    table1 = pd.read_csv(study / "tables" / "table1.csv").set_index("model")["trained_by_other_code"]
    assert not table1["model_09"] and table1["model_17"], "model_17's seeds 1 and 2 are unchecked"
    assert table1.drop(index=["model_09"]).all()
    page = (study / "README.md").read_text()
    assert f"commit {commit[:12]} (2 of 19 runs: epochs 1-1, 1 of 19 runs: epochs 1-2)" in page
