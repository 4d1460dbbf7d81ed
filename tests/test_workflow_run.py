"""The whole workflow on a tiny subset of the real CIFAR-10: every job, every file, the tables."""

from __future__ import annotations

import copy
import re

import pandas as pd
import pytest
import yaml

from conftest import TINY, snakemake
from test_workflow_static import _jobs

pytestmark = pytest.mark.slow


def _table(run, number):
    return [name for name, spec in run["models"].items() if spec["table"] == number]


def test_every_model_has_its_files(tiny_run):
    results = tiny_run["work"] / "results" / "tiny"
    for name in tiny_run["models"]:
        for path in (
            f"models/{name}/seed_0/model.keras",
            f"models/{name}/seed_0/history.csv",
            f"models/{name}/seed_0/train_info.json",
            f"metrics/{name}/seed_0/metrics.json",
            f"metrics/{name}/seed_0/test_probs.npz",
            f"logs/train/{name}/seed_0.log",
            f"benchmarks/train/{name}/seed_0.tsv",
            f"logs/evaluate/{name}/seed_0.log",
        ):
            assert (results / path).is_file(), path
        log = (results / f"logs/train/{name}/seed_0.log").read_text()
        assert "  loss " in log and "epoch 1/" in log  # per-epoch progress in the job's log
    assert not (results / "train_state").exists() or not any((results / "train_state").rglob("*.json"))


def test_table1_has_one_row_per_rung_with_values_in_range(tiny_run):
    reports = tiny_run["work"] / "reports" / "tiny"
    for fmt in ("md", "csv", "tex", "html"):
        assert (reports / f"table1.{fmt}").stat().st_size > 0
    table = pd.read_csv(reports / "table1.csv")
    assert table["model"].tolist() == _table(tiny_run, 1)
    for col in ("accuracy", "val_accuracy", "test_accuracy", "f1_macro"):
        assert table[f"{col}_mean"].between(0, 1).all(), col
    for col in ("loss", "val_loss", "test_loss", "train_seconds"):
        assert (table[f"{col}_mean"] >= 0).all(), col
    assert (table["epochs_run_mean"] == 1).all() and (table["n"] == 1).all()
    assert table.loc[table["model"] == "model_10", "accuracy_study"].item() == 0.9078
    md = (reports / "table1.md").read_text()
    assert "| model_10 " in md and "0.9078" in md
    assert "\\toprule" in (reports / "table1.tex").read_text()
    # model_17 records test accuracy per epoch: the table gets time-to-accuracy columns
    assert {"time_to_087_mean", "time_to_094_mean"} <= set(table) and "Time to 0.87 test acc." in md


def test_table2_has_the_transfer_models_with_the_studys_numbers(tiny_run):
    reports = tiny_run["work"] / "reports" / "tiny"
    table = pd.read_csv(reports / "table2.csv")
    assert (
        table["model"].tolist() == _table(tiny_run, 2) == ["model_12", "model_13", "model_14", "model_15", "model_16"]
    )
    assert table["test_accuracy_mean"].between(0, 1).all()
    assert table.set_index("model")["epochs_run_mean"].to_dict() == {
        "model_12": 1,
        "model_13": 2,
        "model_14": 1,
        "model_15": 1,
        "model_16": 1,
    }  # model_13 trains in two phases
    assert table.set_index("model").loc["model_14", "val_accuracy_study"] == 0.43
    for fmt in ("md", "html"):
        assert "model_16" in (reports / f"table2.{fmt}").read_text()
    assert "model\\_16" in (reports / "table2.tex").read_text()  # LaTeX-escaped
    # weights: none in the tiny preset, so nothing was fetched
    assert not (tiny_run["work"] / "resources" / "weights").exists()


def test_changing_one_learning_rate_replans_only_that_model(tiny_run, tmp_path):
    cfg = copy.deepcopy(tiny_run["cfg"])
    model_04 = next(m for m in cfg["models"] if m["name"] == "model_04")
    model_04["optimizer"] = {"name": "sgd", "learning_rate": 0.02}
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump(cfg, sort_keys=False))
    proc = snakemake(
        "-n", "--directory", str(tiny_run["work"]), "--configfile", str(changed), TINY, *tiny_run["config"]
    )
    # model_info holds every resolved entry, plots, tables and MLflow read every evaluation: each redoes once.
    assert _jobs(proc.stdout) == {
        "spec": 1,
        "train": 1,
        "evaluate": 1,
        "model_info": 1,
        "plots": 1,
        "report": 1,
        "track": 1,
        "all": 1,
    }
    assert set(re.findall(r"wildcards: model=(\w+)", proc.stdout)) == {"model_04"}


def test_nothing_to_do_after_the_run(tiny_run):
    proc = snakemake("-n", "--directory", str(tiny_run["work"]), "--configfile", TINY, *tiny_run["config"])
    assert "Nothing to be done" in proc.stdout + proc.stderr
