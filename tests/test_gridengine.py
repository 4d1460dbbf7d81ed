"""Grid Engine: the profiles/gridengine profile (generic cluster executor) on a real one-host cell."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time

import pandas as pd
import pytest
import yaml

from conftest import BIN, REPO, TINY, copy_workdir, missing, require_mirror, saved_epoch, snakemake, wait_for_epoch
from gridengine_cluster import GPU_COMPLEX, PE, QUEUE, Cluster, install
from test_workflow_static import _jobs

GE_PROFILE = REPO / "profiles" / "gridengine"
SUBMIT = GE_PROFILE / "submit.py"
STATUS = GE_PROFILE / "status.py"


def _write(path, data):
    path.write_text(yaml.safe_dump(data))
    return str(path)


# ---- the profile and its scripts, without a cluster -------------------------------------------
def test_gridengine_profile_plans_the_dag_with_the_right_resources(tmp_path):
    proc = snakemake(
        "--profile",
        str(GE_PROFILE),
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
    assert jobs["train"] == jobs["evaluate"] > 0 and "download" in jobs, jobs  # counts: config.yaml's business
    blocks = [b for b in proc.stdout.split("\n\n") if re.search(r"^rule train:", b, re.M)]
    resources = re.search(r"resources: (.*)", blocks[0])[1]
    assert "threads: 8" in blocks[0] and "mem_mb=16000" in resources and "gpu=1" in resources, blocks[0]
    assert "sge_pe=smp" in resources and "sge_mem=mem_free" in resources and "sge_gpu=none" in resources, resources


def _jobscript(path, rule, threads, resources, wildcards=None):
    props = {
        "type": "single",
        "rule": rule,
        "local": False,
        "input": [],
        "output": [],
        "wildcards": wildcards or {},
        "params": {},
        "log": [],
        "threads": threads,
        "resources": resources,
        "jobid": 7,
        "cluster": {},
    }
    path.write_text(f"#!/bin/sh\n# properties = {json.dumps(props)}\necho job\n")
    return str(path)


def _submit_dry_run(tmp_path, *args):
    proc = subprocess.run([str(SUBMIT), "--dry-run", *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return shlex.split(proc.stdout)


def test_submit_maps_threads_memory_runtime_and_gpu_to_qsub_options(tmp_path):
    site = {"sge_queue": "gpu.q", "sge_pe": "smp", "sge_mem": "h_vmem,mem_free", "sge_gpu": "gpu"}
    train = _jobscript(
        tmp_path / "train.sh",
        "train",
        8,
        {"mem_mb": 16000, "runtime": 90, "gpu": 1, **site},
        {"model": "model_03", "seed": "0"},
    )
    cmd = _submit_dry_run(tmp_path, train)
    assert cmd[:6] == ["qsub", "-terse", "-V", "-cwd", "-S", "/bin/bash"] and cmd[-2:] == ["<", train], cmd
    opts = " ".join(cmd)
    assert "-N smk.train.model_03.0" in opts and "-q gpu.q" in opts and "-pe smp 8" in opts, opts
    assert "-l h_rt=01:30:00,h_vmem=2000M,mem_free=2000M,gpu=1" in opts, opts  # memory per slot
    assert "-j y -o .snakemake/gridengine_logs/train/smk.train.model_03.0.$JOB_ID.log" in opts, opts
    assert (tmp_path / ".snakemake/gridengine_logs/train").is_dir()  # qsub would not create it

    # The profile's defaults: no queue, no GPU request; one thread: no parallel environment.
    defaults = {"sge_queue": "none", "sge_pe": "smp", "sge_mem": "mem_free", "sge_gpu": "none"}
    report = _jobscript(tmp_path / "report.sh", "report", 1, {"mem_mb": 2000, "runtime": 30, "gpu": 1, **defaults})
    opts = " ".join(_submit_dry_run(tmp_path, report))
    assert "-q" not in opts.split() and "-pe" not in opts and "gpu=" not in opts, opts
    assert "-l h_rt=00:30:00,mem_free=2000M" in opts, opts

    # The script goes to qsub on stdin with the submit host's PATH restored: a login shell's
    # profile on the execution host must not swap the python the rules run.
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "qsub").write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/qsub.args\ncat > {tmp_path}/qsub.stdin\necho 123\n')
    (fake / "qsub").chmod(0o755)
    path = f"{fake}{os.pathsep}{os.environ['PATH']}"
    proc = subprocess.run(
        [str(SUBMIT), train], cwd=tmp_path, env={**os.environ, "PATH": path}, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0 and proc.stdout == "123\n", proc.stderr
    sent = (tmp_path / "qsub.stdin").read_text().splitlines()
    assert sent[1].startswith("# properties = ") and sent[2].startswith(f"export PATH={shlex.quote(path)} "), sent
    assert sent[3] == "echo job" and "-pe smp 8" in (tmp_path / "qsub.args").read_text()


def _fake_grid_engine(tmp_path, qstat_xml, qacct_text=None):
    """qstat/qacct/qdel stand-ins on PATH: what a real cell answers, without one."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir(exist_ok=True)
    (tmp_path / "qstat.xml").write_text(qstat_xml)
    scripts = {
        "qstat": f'[ "$1" = -j ] && exit 0; cat {tmp_path}/qstat.xml',
        "qacct": f"cat {tmp_path}/qacct.txt 2>/dev/null || {{ echo 'error: job id $2 not found' >&2; exit 1; }}",
        "qdel": f'echo "$@" >> {tmp_path}/qdel.calls',
    }
    for name, body in scripts.items():
        (bin_dir / name).write_text(f"#!/bin/sh\n{body}\n")
        (bin_dir / name).chmod(0o755)
    if qacct_text is not None:
        (tmp_path / "qacct.txt").write_text(qacct_text)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def _status(tmp_path, env, jobid="42"):
    proc = subprocess.run([str(STATUS), jobid], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def _qstat_xml(*jobs):
    rows = "".join(
        f"<job_list><JB_job_number>{j}</JB_job_number><JB_name>x</JB_name><state>{s}</state></job_list>"
        for j, s in jobs
    )
    return f"<?xml version='1.0'?><job_info><queue_info>{rows}</queue_info><job_info></job_info></job_info>"


def _qacct(*records):
    sep = "=" * 62 + "\n"
    return "".join(f"{sep}jobnumber    42\nfailed       {f}\nexit_status  {e}\n" for f, e in records)


def test_status_reports_running_success_and_failed(tmp_path):
    assert _status(tmp_path, _fake_grid_engine(tmp_path, _qstat_xml(("42", "r"), ("43", "qw")))) == "running"
    assert _status(tmp_path, _fake_grid_engine(tmp_path, _qstat_xml(("42", "dr")))) == "running"  # being deleted
    env = _fake_grid_engine(tmp_path, _qstat_xml(("41", "r")), _qacct(("0", "0")))
    assert _status(tmp_path, env) == "success"
    # a rescheduled job has several records: the last one counts
    env = _fake_grid_engine(tmp_path, _qstat_xml(), _qacct(("0", "0"), ("100 : assumedly after job", "137")))
    assert _status(tmp_path, env) == "failed"
    env = _fake_grid_engine(tmp_path, _qstat_xml(), _qacct(("0", "1")))
    assert _status(tmp_path, env) == "failed"
    # an error state (Eqw) never clears by itself: failed, and the job is deleted
    assert _status(tmp_path, _fake_grid_engine(tmp_path, _qstat_xml(("42", "Eqw")))) == "failed"
    assert (tmp_path / "qdel.calls").read_text().split() == ["42"]


def test_status_waits_a_bounded_time_for_the_accounting_record(tmp_path):
    env = _fake_grid_engine(tmp_path, _qstat_xml())  # gone from qstat, not (yet) in qacct
    assert _status(tmp_path, {**env, "SGE_STATUS_QACCT_WAIT": "60"}) == "running"
    (tmp_path / "qacct.txt").write_text(_qacct(("0", "0")))  # the record arrives
    assert _status(tmp_path, env) == "success"
    assert not (tmp_path / ".snakemake/gridengine_logs/status/42").exists()
    (tmp_path / "qacct.txt").unlink()
    env = {**env, "SGE_STATUS_QACCT_WAIT": "1"}
    assert _status(tmp_path, env) == "running"
    time.sleep(1.5)
    assert _status(tmp_path, env) == "failed"  # never arrived


# ---- a real Grid Engine --------------------------------------------------------------------
@pytest.fixture(scope="module")
def gridengine(tmp_path_factory):
    """A real Grid Engine cell (sge_qmaster + sge_execd); its jobs and daemons stopped after."""
    if os.geteuid() != 0:
        missing("the Grid Engine test starts daemons and installs Debian packages: run it as root (CI does)")
    try:
        install()
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        missing(f"Grid Engine is not installed and installing it failed: {exc}")
    cluster = Cluster(tmp_path_factory.mktemp("gridengine"))
    try:
        yield cluster.start(timeout=120)
    finally:
        cluster.stop()


def _profile_args(workdir, extra, mirror):
    return [
        "--profile",
        str(GE_PROFILE),
        "--workflow-profile",
        "none",
        "--directory",
        str(workdir),
        "--configfile",
        TINY,
        extra,
        "--config",
        f"data_source={mirror}",
        # This cell's site settings, restating the profile's other defaults (as the docs say);
        # the profile's threads and set-resources apply.
        "--default-resources",
        f"sge_queue='{QUEUE}'",
        f"sge_pe='{PE}'",
        "sge_mem='mem_free'",
        f"sge_gpu='{GPU_COMPLEX}'",
        "runtime=30",
        "mem_mb=4000",
        "--seconds-between-status-checks",
        "3",
        "--latency-wait",
        "10",
    ]


def _start(cmd, log, env):
    """Snakemake in its own session, SIGINT at its default: a shell that starts jobs in the
    background (nohup ... &) leaves SIGINT ignored, the child inherits that, Python then installs
    no KeyboardInterrupt handler and Snakemake never sees the Ctrl-C (two CI rehearsals failed so)."""
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _records(cluster, prefix, after):
    return [r for r in cluster.qacct() if r.get("jobname", "").startswith(prefix) and int(r["jobnumber"]) > after]


def _last_job(cluster):
    return max((int(r["jobnumber"]) for r in cluster.qacct()), default=0)


@pytest.mark.slow
def test_workflow_runs_on_gridengine_through_the_profile(gridengine, tmp_path):
    mirror = require_mirror()
    models = ["model_01", "model_10"]
    extra = _write(tmp_path / "cluster.yaml", {"run_models": models})
    before = _last_job(gridengine)
    started = time.time()
    snakemake(*_profile_args(tmp_path, extra, mirror), "--retries", "0", env=gridengine.client_env, timeout=900)
    wall = time.time() - started
    # status.py reports success only once qacct has the job's record: all records are there.
    train = _records(gridengine, "smk.train.", before)
    assert sorted(next(m for m in models if m in r["jobname"]) for r in train) == models, gridengine.qacct()
    evaluate = _records(gridengine, "smk.evaluate.", before)
    assert len(evaluate) == 2, evaluate
    for row, slots in [(r, "8") for r in train] + [(r, "4") for r in evaluate]:  # the profile's set-threads
        assert row["slots"] == slots and row["failed"] == "0" and row["exit_status"] == "0", row
        category = row["category"]
        assert f"-pe {PE} {slots}" in category and f"{GPU_COMPLEX}=1" in category and f"-q {QUEUE}" in category, row
    assert "h_rt=5400" in train[0]["category"] and "mem_free=2000M" in train[0]["category"]  # 90 min; 16 GB / 8
    all_jobs = _records(gridengine, "smk.", before)
    assert not any(
        r["jobname"].startswith(("smk.download", "smk.spec", "smk.model_info")) for r in all_jobs
    )  # localrules
    logs = sorted(p.name for p in (tmp_path / ".snakemake/gridengine_logs/train").glob("*.log"))
    assert len(logs) == 2 and all(p.startswith("smk.train.model_") for p in logs), logs
    table1 = pd.read_csv(tmp_path / "reports/tiny/table1.csv")
    assert table1["model"].tolist() == models
    fields = ("jobnumber", "jobname", "slots", "exit_status", "failed", "ru_wallclock")
    lines = "\n".join(" | ".join(r[f] for f in fields) for r in all_jobs)
    (tmp_path / "qacct.txt").write_text(lines)
    print(f"Grid Engine workflow: {wall:.0f} s, {len(all_jobs)} Grid Engine jobs\n{' | '.join(fields)}\n{lines}")


@pytest.mark.slow
def test_training_job_killed_with_qdel_is_resubmitted_and_resumes(gridengine, tmp_path):
    mirror = require_mirror()
    extra = _write(tmp_path / "one.yaml", {"run_models": ["model_03"], "model_overrides": {"epochs": 6}})
    before = _last_job(gridengine)
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **gridengine.client_env}
    out = tmp_path / "snakemake.out"
    # The profile's own retries (2) resubmit the killed job. The target is the trained model: the
    # data stage and the training job, none of the report jobs that would follow.
    target = "results/tiny/models/model_03/seed_0/model.keras"
    cmd = [
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        target,
        *_profile_args(tmp_path, extra, mirror),
    ]
    with open(out, "w") as log:
        proc = _start(cmd, log, env)
    try:
        state = tmp_path / "results/tiny/train_state/model_03/seed_0"
        wait_for_epoch(state, 2, proc, timeout=600)
        assert saved_epoch(state) >= 2, out.read_text()[-3000:]
        running = [j for j in gridengine.jobs() if j["name"] == "smk.train.model_03.0" and j["state"] == "r"]
        assert len(running) == 1, (gridengine.jobs(), out.read_text()[-3000:])
        killed = running[0]["id"]
        subprocess.run(["qdel", killed], env=env, check=True, capture_output=True, timeout=60)
        proc.wait(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = out.read_text()
    assert proc.returncode == 0, output[-5000:]
    train = _records(gridengine, "smk.train.model_03.", before)
    assert len(train) == 2 and train[0]["jobnumber"] == killed, train
    assert train[0]["failed"] != "0" and train[1]["failed"] == "0" and train[1]["exit_status"] == "0", train
    assert "h_rt=5400" in train[0]["category"] and "h_rt=10800" in train[1]["category"], train  # runtime x attempt
    train_log = (tmp_path / "results/tiny/logs/train/model_03/seed_0.log").read_text()
    resumed = re.search(r"resuming after epoch (\d+)", train_log)
    assert resumed and int(resumed[1]) >= 2, train_log[-3000:]
    assert f"INFO epoch {int(resumed[1]) + 1}/6" in train_log and f"INFO epoch {resumed[1]}/6" not in train_log, (
        train_log[-3000:]
    )
    assert f"INFO restored epoch {resumed[1]}/6" in train_log, train_log[-3000:]
    history = pd.read_csv(tmp_path / "results/tiny/models/model_03/seed_0/history.csv")
    assert history["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    jobs = _jobs(output)
    assert "preprocess" in jobs and jobs.get("train") == 1, jobs
    print(f"qdel'd Grid Engine job {killed} after epoch {resumed[1]}; resubmitted as {train[1]['jobnumber']}")


@pytest.mark.slow
def test_ctrl_c_deletes_the_running_jobs(gridengine, tmp_path, tiny_prepared):
    """The profile's cancel command: Snakemake interrupted with Ctrl-C runs qdel on its jobs."""
    mirror = require_mirror()
    copy_workdir(tiny_prepared, tmp_path)  # the data stage done: the training job is the one to delete
    # Long enough to be running whenever the signal lands (50 epochs of the tiny data took 3 s).
    extra = _write(tmp_path / "long.yaml", {"run_models": ["model_01"], "model_overrides": {"epochs": 3000}})
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", **gridengine.client_env}
    cmd = [str(BIN / "snakemake"), "--snakefile", str(REPO / "Snakefile"), *_profile_args(tmp_path, extra, mirror)]
    out = tmp_path / "snakemake.out"
    with open(out, "w") as log:
        proc = _start(cmd, log, env)
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if any(j["name"] == "smk.train.model_01.0" and j["state"] == "r" for j in gridengine.jobs()):
                break
            time.sleep(1)
        train = [j for j in gridengine.jobs() if j["name"] == "smk.train.model_01.0"]
        assert train and proc.poll() is None, (gridengine.jobs(), out.read_text()[-3000:])
        # Ctrl-C, pressed again (at most twice more) while Snakemake has not begun to stop: one
        # SIGINT in a CI run went unanswered and the workflow ran to its end.
        for _ in range(3):
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
                break
            except subprocess.TimeoutExpired:
                if "Terminating processes" in out.read_text():
                    break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    deadline = time.time() + 60
    while gridengine.jobs() and time.time() < deadline:
        time.sleep(1)
    assert gridengine.jobs() == [], out.read_text()[-3000:]
    assert proc.returncode != 0 and f"job {train[0]['id']} for deletion" in out.read_text(), out.read_text()[-3000:]
