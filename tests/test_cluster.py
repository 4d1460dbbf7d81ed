"""Cluster execution: the SLURM profile, on a real one-node SLURM; GPU limits; preemption."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from datetime import datetime

import pandas as pd
import pytest
import yaml

from conftest import (
    BIN,
    REPO,
    SWEEP_POINTS,
    TINY,
    copy_workdir,
    missing,
    require_mirror,
    saved_epoch,
    snakemake,
    wait_for_epoch,
)
from slurm_cluster import ACCOUNT, PARTITION, Cluster, install
from test_workflow_static import _jobs

SLURM_PROFILE = str(REPO / "profiles" / "slurm")


def _job_blocks(output: str, rule: str) -> list[str]:
    return [block for block in output.split("\n\n") if re.search(rf"^rule {rule}:", block, re.M)]


def test_slurm_profile_plans_the_dag_with_the_right_resources(tmp_path):
    # A dry run uses the local executor, which caps threads at --cores: give it a cluster-sized value.
    proc = snakemake(
        "--profile",
        SLURM_PROFILE,
        "--workflow-profile",
        "none",
        "-n",
        "--cores",
        "64",
        "--directory",
        str(tmp_path),
        "--config",
        "data_source=/x.tar.gz",
    )
    jobs = _jobs(proc.stdout)
    # 18 entries, model_10, model_17 and model_18 with three seeds each
    assert jobs["train"] == jobs["evaluate"] == 24 and jobs["fetch_weights"] == 3
    train = {re.search(r"wildcards: model=(\w+)", b)[1]: b for b in _job_blocks(proc.stdout, "train")}
    for model, minutes in (("model_10", 90), ("model_15", 180)):
        resources = re.search(r"resources: (.*)", train[model])[1]
        assert "gpu=1" in resources and "mem_mb=16000" in resources, resources
        assert f"runtime={minutes}" in resources and "slurm_partition=your_partition" in resources, resources
        assert "threads: 8" in train[model] and "cpus_per_task=8" in resources, train[model]
    evaluate = re.search(r"resources: (.*)", _job_blocks(proc.stdout, "evaluate")[0])[1]
    assert "gpu=1" in evaluate and "runtime=20" in evaluate


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _log_span(log_path):
    """First and last timestamp of a job log (our scripts log with '%Y-%m-%d %H:%M:%S')."""
    stamps = re.findall(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) ", log_path.read_text(), re.M)
    return datetime.fromisoformat(stamps[0]), datetime.fromisoformat(stamps[-1])


@pytest.mark.slow
def test_local_gpu_resource_limits_concurrent_training(sweep_run):
    """Three one-thread training jobs on two cores under --resources gpu=1 (the sweep run) never overlap."""
    spans = sorted(_log_span(sweep_run["results"] / f"logs/train/{m}/seed_0.log") for m in ["model_01", *SWEEP_POINTS])
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, f"training jobs overlapped with gpu=1: {spans}"


@pytest.mark.slow
def test_killed_training_job_resumes_and_nothing_else_reruns(tmp_path, tiny_prepared):
    """kill -9 Snakemake and its training job after epoch 2, as a node failure would; rerun."""
    mirror = require_mirror()
    copy_workdir(tiny_prepared, tmp_path)
    extra = _write(tmp_path / "one.yaml", {"run_models": ["model_03"], "model_overrides": {"epochs": 5}})
    # Up to the evaluated run: the report jobs after it have nothing to do with the kill.
    target = "results/tiny/metrics/model_03/seed_0/metrics.json"
    args = [
        target,
        "--directory",
        str(tmp_path),
        "--configfile",
        TINY,
        extra,
        "--config",
        f"data_source={mirror}",
        "--cores",
        "2",
    ]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "first.out", "w")
    first = subprocess.Popen(
        [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), *args],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    state = tmp_path / "results/tiny/train_state/model_03/seed_0"
    wait_for_epoch(state, 2, first, timeout=600)
    os.killpg(first.pid, signal.SIGKILL)  # Snakemake and its job, no clean-up
    first.wait()
    assert saved_epoch(state) == 2, (tmp_path / "first.out").read_text()[-3000:]
    assert not (tmp_path / "results/tiny/models/model_03/seed_0/model.keras").exists()

    snakemake("--unlock", *args)  # a killed Snakemake leaves its lock behind
    started = time.time()
    proc = snakemake(*args)
    jobs = _jobs(proc.stdout + proc.stderr)
    assert jobs.get("train") == 1 and "preprocess" not in jobs and "download" not in jobs, jobs
    train_log = (tmp_path / "results/tiny/logs/train/model_03/seed_0.log").read_text()
    assert "resuming after epoch 2" in train_log and "INFO epoch 3/5" in train_log
    # Epochs 1 and 2 are not trained again; the log still shows them, as restored from the checkpoint.
    assert "INFO epoch 1/5" not in train_log and "INFO epoch 2/5" not in train_log
    assert "INFO restored epoch 1/5" in train_log and "INFO restored epoch 2/5" in train_log
    run = tmp_path / "results/tiny/models/model_03/seed_0"
    assert pd.read_csv(run / "history.csv")["epoch"].tolist() == [1, 2, 3, 4, 5]  # every epoch exactly once
    info = json.loads((run / "train_info.json").read_text())
    assert info["resumed_from_epoch"] == 2 and info["epochs_run"] == 5
    print(f"preemption rerun: {time.time() - started:.1f} s")


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A real SLURM (slurmctld, slurmd, slurmdbd, MariaDB, munge); every daemon stopped after."""
    if os.geteuid() != 0:
        missing("the SLURM test starts daemons and installs Debian packages: run it as root (CI does)")
    install()
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster.start(timeout=180)
    finally:
        cluster.stop()


@pytest.mark.slow
def test_workflow_runs_on_slurm_through_the_profile(slurm, tmp_path):
    mirror = require_mirror()
    models = ["model_01", "model_10", "model_12"]
    extra = _write(tmp_path / "cluster.yaml", {"run_models": models})
    started = time.time()
    proc = snakemake(
        "--profile",
        SLURM_PROFILE,
        "--workflow-profile",
        "none",
        "--directory",
        str(tmp_path),
        "--configfile",
        TINY,
        extra,
        "--config",
        f"data_source={mirror}",
        # Only this cluster's partition and account are given, restating the profile's other
        # defaults, as the README tells users; the profile's threads and set-resources apply.
        "--default-resources",
        f"slurm_partition={PARTITION}",
        f"slurm_account={ACCOUNT}",
        "runtime=30",
        "mem_mb=4000",
        "cpus_per_task=threads",
        "--slurm-init-seconds-before-status-checks",
        "2",
        "--seconds-between-status-checks",
        "3",
        "--latency-wait",
        "10",
        "--retries",
        "0",
        env={"SLURM_CONF": str(slurm.root / "slurm.conf")},
        timeout=900,
    )
    wall = time.time() - started
    time.sleep(6)  # accounting is asynchronous
    rows = slurm.sacct("JobID", "JobName", "Comment", "State", "AllocTRES", "ReqTRES", "Elapsed")
    train = [r for r in rows if r["Comment"].startswith("rule_train_")]
    assert sorted(next(m for m in models if m in r["Comment"]) for r in train) == models, rows
    for row in train:
        assert row["State"] == "COMPLETED" and "gres/gpu=1" in row["AllocTRES"], row
        assert "cpu=8" in row["AllocTRES"] and "mem=16" in row["AllocTRES"], row  # the profile's sizes
    evaluate = [r for r in rows if r["Comment"].startswith("rule_evaluate_")]
    assert len(evaluate) == 3 and all("gres/gpu=1" in r["AllocTRES"] for r in evaluate)
    assert not any(r["Comment"].startswith(("rule_download", "rule_spec")) for r in rows)  # localrules
    table1 = pd.read_csv(tmp_path / "reports/tiny/table1.csv")
    assert table1["model"].tolist() == ["model_01", "model_10"]
    assert (tmp_path / "reports/tiny/table2.md").is_file()
    lines = "\n".join("|".join(r.values()) for r in rows)
    (tmp_path / "sacct.txt").write_text(lines)
    print(f"SLURM workflow: {wall:.0f} s, {len(rows)} SLURM jobs\n{lines}\n{proc.stderr[-500:]}")
