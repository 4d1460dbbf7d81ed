"""Explore and compare: sweeps as config, live TensorBoard curves, runs recorded in MLflow."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pandas as pd
import pytest
import yaml

from conftest import BIN, SWEEP_POINTS, TOOLS, snakemake

pytestmark = pytest.mark.slow

POINTS = SWEEP_POINTS


def test_a_sweep_expands_into_entries_that_train_and_fill_the_sweep_table(sweep_run):
    planned = {
        line.split("model=")[1].split(",")[0] for line in sweep_run["dry"].splitlines() if "wildcards: model=" in line
    }
    assert planned == {"model_01", *POINTS}  # `snakemake -n` shows the expansion
    for name in POINTS:
        spec = json.loads((sweep_run["results"] / "specs" / f"{name}.json").read_text())
        assert spec["optimizer"]["learning_rate"] == float(name.rsplit("-", 1)[1]) and spec["epochs"] == 2
    table = pd.read_csv(sweep_run["work"] / "reports" / "tiny" / "sweeps.csv")
    assert table["model"].tolist() == POINTS and table["sweep"].tolist() == ["lr", "lr"]
    assert table["optimizer.learning_rate"].tolist() == [0.02, 0.005]
    assert table["val_accuracy_mean"].between(0, 1).all() and (table["n"] == 1).all()
    table1 = pd.read_csv(sweep_run["work"] / "reports" / "tiny" / "table1.csv")
    assert table1["model"].tolist() == ["model_01"]  # sweep points stay out of the study's tables
    assert (sweep_run["results"] / "plots" / "sweeps.png").stat().st_size > 10_000


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"optimizer.learning_rat": [0.1]}, r"'optimizer.learning_rat' is not a setting of a model entry"),
        ({"dropout": []}, r"grid.dropout: \[\] should be non-empty"),
    ],
)
def test_a_bad_sweep_is_a_config_error_before_any_job(grid, message, tmp_path):
    import re

    extra = tmp_path / "bad.yaml"
    extra.write_text(yaml.safe_dump({"sweeps": [{"name": "bad", "base": "model_10", "grid": grid}]}))
    proc = snakemake(
        "-n", "--directory", str(tmp_path), "--configfile", str(extra), "--config", "data_source=/x", check=False
    )
    assert proc.returncode != 0 and re.search(message, proc.stdout + proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "results").exists()


def test_training_writes_tensorboard_event_files_with_the_epoch_metrics(sweep_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    logdir = sweep_run["results"] / "models" / "model_01" / "seed_0" / "tensorboard"
    history = pd.read_csv(sweep_run["results"] / "models" / "model_01" / "seed_0" / "history.csv")
    for run, column in (("train", "loss"), ("validation", "val_loss")):
        events = EventAccumulator(str(logdir / run), size_guidance={"tensors": 0})
        events.Reload()
        tensors = events.Tensors("epoch_loss")
        assert [t.step for t in tensors] == [0, 1]
        values = [float(make_ndarray(t.tensor_proto)) for t in tensors]
        assert values == pytest.approx(history[column].tolist(), rel=1e-6)


def _client(results):
    import mlflow
    from mlflow.tracking import MlflowClient

    recorded = json.loads((results / "mlflow" / "recorded.json").read_text())
    mlflow.set_tracking_uri(recorded["tracking_uri"])
    return MlflowClient(), recorded


def test_every_run_is_recorded_in_mlflow_once(sweep_run):
    client, recorded = _client(sweep_run["results"])
    runs = client.search_runs([recorded["experiment_id"]])
    assert sorted(r.data.tags["model"] for r in runs) == sorted(["model_01", *POINTS])
    run = next(r for r in runs if r.data.tags["model"] == POINTS[0])
    assert run.data.params["optimizer.learning_rate"] == "0.02" and run.data.params["seed"] == "0"
    assert run.data.tags["sweep"] == "lr" and len(run.data.tags["git_commit"]) == 40
    metrics = json.loads((sweep_run["results"] / "metrics" / POINTS[0] / "seed_0" / "metrics.json").read_text())
    assert run.data.metrics["final_test_accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert "final_test_f1_cat" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val_loss")] == [1, 2]
    for kind in ("curves", "confusion"):
        artifacts = [a.path for a in client.list_artifacts(run.info.run_id, f"figures/{kind}")]
        assert artifacts == [f"figures/{kind}/{POINTS[0]}_seed0.png"]

    # Recording again (a rerun of the rule) updates the same runs: nothing is duplicated.
    (sweep_run["results"] / "mlflow" / "recorded.json").unlink()
    snakemake("results/tiny/mlflow/recorded.json", *sweep_run["args"], "--cores", "1")
    again = client.search_runs([recorded["experiment_id"]])
    assert len(again) == len(runs) and {r.info.run_id for r in again} == {r.info.run_id for r in runs}
    assert len(client.get_metric_history(run.info.run_id, "val_loss")) == 2


def test_mlflow_server_serves_the_runs(sweep_run):
    _, recorded = _client(sweep_run["results"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            recorded["tracking_uri"],
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        body, deadline = None, time.time() + 120
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/2.0/mlflow/runs/search",
            data=json.dumps({"experiment_ids": [recorded["experiment_id"]]}).encode(),
            headers={"Content-Type": "application/json"},
        )
        while body is None and time.time() < deadline and server.poll() is None:
            try:
                body = json.loads(urllib.request.urlopen(request, timeout=5).read())
            except OSError:
                time.sleep(1)
        assert body is not None, "mlflow server did not answer on loopback within 120 s"
        assert len(body["runs"]) == 3
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)


def test_compare_shows_only_what_differs_sorted(sweep_run):
    proc = subprocess.run(
        [
            sys.executable,
            str(TOOLS / "compare.py"),
            "--results",
            str(sweep_run["results"]),
            "--sweep",
            "lr",
            "--sort",
            "optimizer.learning_rate",
            "--ascending",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("| model_01")]
    assert [line.split("|")[1].strip() for line in lines] == POINTS[::-1]  # 0.005 first
    header = proc.stdout.splitlines()[0]
    assert "optimizer.learning_rate" in header and "batch_size" not in header  # only what differs
    table = pd.read_csv(sweep_run["work"] / "reports" / "tiny" / "compare.csv")
    assert set(table["model"]) == {"model_01", *POINTS}
