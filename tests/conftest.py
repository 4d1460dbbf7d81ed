"""Shared fixtures: a test-built CIFAR-format archive, the real mirror, workflow runners."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "workflow_scripts"
TOOLS = REPO / "tools"
MIRROR = Path(os.environ.get("CIFAR10_ARCHIVE", REPO.parent / "shared" / "data" / "cifar-10-python.tar.gz"))
CLASS_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
BIN = Path(sys.executable).parent  # the environment the tests run in (snakemake, python)
TINY = str(REPO / "presets" / "tiny.yaml")
# Tiny runs: two one-thread jobs at a time. Their jobs are mostly TensorFlow's start-up, which two
# jobs overlap; training counts against the `gpu` resource (1 by default), so it would run serially.
TWO_AT_ONCE = ("--cores", "2", "--resources", "gpu=2", "--set-threads", "train=1", "evaluate=1")
# Two one-thread jobs at a time but one GPU: training jobs run one after another (the `gpu` limit).
ONE_GPU = ("--cores", "2", "--resources", "gpu=1", "--set-threads", "train=1", "evaluate=1")
# A sweep of the tiny preset (tests/test_tracking.py): model_01 and two learning rates.
SWEEP = {
    "run_models": ["model_01", "lr"],
    "sweeps": [{"name": "lr", "base": "model_01", "grid": {"optimizer.learning_rate": [0.02, 0.005]}}],
}
SWEEP_POINTS = ["model_01__learning_rate-0.02", "model_01__learning_rate-0.005"]


UNDER_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# Work started early (see ``early``) runs at a lower CPU priority beside the other tests: how long it
# takes depends on them and on the day's machine speed (up to 2x), so a fixed time limit on it is a
# timed test (one of 1200 s killed the tiny run in CI on a slow day). Its limit is the session's
# end instead, 75 minutes after pytest starts, inside CI's own limit of 90 minutes (the install
# included), which would end the session without a word: a hang still fails, and says so.
SESSION_END = time.monotonic() + 75 * 60


def until_session_end() -> float:
    """The time limit, in seconds, of a step of work started early: what is left of the session."""
    return max(SESSION_END - time.monotonic(), 60.0)


def missing(what: str) -> None:
    """A prerequisite is missing: under CI (CI=true) the test fails, saying what; locally it is
    skipped, and pytest lists it at the end (-ra)."""
    if UNDER_CI:
        pytest.fail(f"CI=true and {what}: this test must run in CI, so the run fails", pytrace=False)
    pytest.skip(what)


def require_mirror() -> Path:
    """The real CIFAR-10 archive; without it: a failure under CI, a listed skip locally."""
    if not MIRROR.is_file():
        missing(f"the real CIFAR-10 mirror is not at {MIRROR} (set CIFAR10_ARCHIVE to its path)")
    return MIRROR


def make_cifar_archive(
    path: Path,
    per_batch: int = 100,
    test_size: int = 100,
    seed: int = 0,
    skip: tuple[str, ...] = (),
    tamper: str | None = None,
) -> dict[str, str]:
    """Write a small archive in the CIFAR-10 python layout; return the md5 of each member.

    Labels cycle through the ten classes so every split is balanced. ``skip`` leaves
    members out; ``tamper`` changes one byte of a member *after* its md5 was taken.
    """
    rng = np.random.default_rng(seed)
    members: dict[str, bytes] = {}
    for i in range(1, 6):
        labels = [(j + i) % 10 for j in range(per_batch)]
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        members[f"data_batch_{i}"] = pickle.dumps(
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels, b"data": data}
        )
    test_labels = [j % 10 for j in range(test_size)]
    members["test_batch"] = pickle.dumps(
        {
            b"batch_label": b"testing batch 1 of 1",
            b"labels": test_labels,
            b"data": rng.integers(0, 256, size=(test_size, 3072), dtype=np.uint8),
        }
    )
    members["batches.meta"] = pickle.dumps(
        {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    )
    md5 = {name: hashlib.md5(blob).hexdigest() for name, blob in members.items()}
    if tamper:
        blob = bytearray(members[tamper])
        blob[len(blob) // 2] ^= 0xFF
        members[tamper] = bytes(blob)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in members.items():
            if name in skip:
                continue
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return md5


@pytest.fixture(scope="session")
def fake_archive(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("fake") / "cifar-10-python.tar.gz"
    return path, make_cifar_archive(path)


def snakemake(*args: str, cwd: Path = REPO, check: bool = True, timeout: float = 1200, env=None, nice: int = 0):
    """Run snakemake from the test environment; return the CompletedProcess (text output).
    ``nice``: it and its jobs at that lower CPU priority (work started early, see ``early``)."""
    full_env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(env or {})}
    cmd = [
        *(["nice", "-n", str(nice)] if nice else []),
        str(BIN / "snakemake"),
        "--snakefile",
        str(REPO / "Snakefile"),
        *args,
    ]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"snakemake {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc


def side_by_side(commands: dict[str, list[str]], logs: Path, env=None, timeout: float = 900) -> None:
    """Run the ``commands`` (name -> argv) as processes at once, each logging to ``logs/<name>.log``;
    fail naming the first that failed, with its log. For independent one-thread jobs: two of them
    keep both of this 2-core machine's cores busy where one after the other would leave one idle."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = {}
    for name, argv in commands.items():
        with open(logs / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    for name, proc in procs.items():
        code = proc.wait(timeout=timeout)
        assert code == 0, f"{name} failed ({code}):\n{(logs / f'{name}.log').read_text()[-4000:]}"


def two_at_a_time(tasks: dict) -> dict:
    """Start the ``tasks`` (key -> function of no argument), two at a time, in the given order;
    return key -> Future (``.result()`` gives the return value or raises the task's error). For
    tasks that each drive one-thread processes one after another (a job killed, then rerun): run
    one by one, they would leave one of this 2-core machine's cores idle."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return {key: pool.submit(task) for key, task in tasks.items()}


def copy_workdir(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True, dirs_exist_ok=True)
    return dst


def load_ladder() -> dict:
    """The entries of config.yaml, resolved (name -> training spec)."""
    import yaml

    from cnnstudy import configuration

    with open(REPO / "config.yaml") as fh:
        return configuration.load(yaml.safe_load(fh))


@pytest.fixture(scope="session")
def ladder_specs() -> dict:
    return load_ladder()


def entry_with(ladder: dict, name: str, **changes) -> dict:
    """A copy of entry ``name`` with ``changes``: dictionaries merged into the entry's, others replaced."""
    import copy

    spec = copy.deepcopy(ladder[name])
    for key, value in changes.items():
        spec[key] = {**spec[key], **value} if isinstance(value, dict) and isinstance(spec.get(key), dict) else value
    return spec


def pins(lines) -> dict:
    """``name==version`` pins of a requirements file's lines (extras such as tensorflow[and-cuda] allowed)."""
    import re

    pin = r"\s*-?\s*([A-Za-z0-9_.-]+)(?:\[[^\]]*\])?==([^\s#]+)"
    return dict(re.match(pin, line).groups() for line in lines if "==" in line)


@pytest.fixture(scope="session")
def sweep_run(tmp_path_factory, tiny_prepared):
    """The tiny preset: model_01 and a two-point sweep over its learning rate, every rule, two jobs
    at a time under gpu=1 (its three training jobs must not overlap: tests/test_cluster.py)."""
    import yaml

    mirror = require_mirror()
    work = copy_workdir(tiny_prepared, tmp_path_factory.mktemp("sweep_run"))
    extra = work / "sweep.yaml"
    extra.write_text(yaml.safe_dump({**SWEEP, "model_overrides": {"epochs": 2, "seeds": [0]}}))
    args = ["--directory", str(work), "--configfile", TINY, str(extra), "--config", f"data_source={mirror}"]
    dry = snakemake("-n", *args)
    snakemake(*args, *ONE_GPU)
    return {"work": work, "args": args, "dry": dry.stdout, "results": work / "results" / "tiny"}


# ---- work started early ----------------------------------------------------------------------
# Runs that need nothing but the data and whose results tests only read begin as the session
# starts, in threads, their processes at a lower CPU priority: they run on the core time the other
# tests leave idle (one-thread jobs, waits for a scheduler, Snakemake's start-up) instead of holding
# the session up at their turn. What is needed sooner runs at a higher priority: the small data
# and the full-data npz (full priority: seconds of work that others start from), the shared and
# equivalence runs (nice 5: test_equivalence, the fifth file), the tiny runs (nice 10:
# test_protocols, test_report), the resume matrix (nice 15: test_resume), then the full-data verify
# runs (nice 17 to 19: one-thread jobs for minutes; the tests waiting for them run last, after every
# other test, which runs beside them). CPU priority changes no number (threads are pinned).
EARLY: dict = {}  # fixture name -> (function(tmp_path_factory, started) giving its value, needs)


def early(name: str, needs: tuple[str, ...] = ()):
    """Register ``function(tmp_path_factory, started)`` as the early work behind the fixture
    ``name``: it starts as the session begins when a selected test uses that fixture, and the
    fixture returns ``started[name].result()``. ``needs``: early work it reads, registered before
    it (``started["full_data"].result()``: the full-data working directory)."""

    def register(function):
        EARLY[name] = function, needs
        return function

    return register


def pytest_collection_modifyitems(items) -> None:
    """Tests marked ``last`` run after all the others, in their order (they wait for the longest
    early work: the tests before them run beside it instead of after it)."""
    items.sort(key=lambda item: item.get_closest_marker("last") is not None)


@pytest.fixture(scope="session", autouse=True)
def started_early(request, tmp_path_factory) -> dict:
    from concurrent.futures import ThreadPoolExecutor

    needed = set().union(*(item.fixturenames for item in request.session.items))
    for name, (_, needs) in reversed(EARLY.items()):
        if name in needed:
            needed.update(needs)
    # The session's temporary folder, made here before any thread asks for one: made first by
    # concurrent threads, it was made once per thread (pytest-N, N+1, ...), and pytest's cleanup of
    # all but the last three deleted a fixture's folder while its job was writing it.
    tmp_path_factory.getbasetemp()
    pool, started = ThreadPoolExecutor(max_workers=max(len(EARLY), 1)), {}
    for name, (function, _) in EARLY.items():  # a dependency is submitted before its dependents
        if name in needed:
            started[name] = pool.submit(function, tmp_path_factory, started)
    yield started
    pool.shutdown(wait=False, cancel_futures=True)  # a session cut short does not wait for it


@early("tiny_data")
def _tiny_data(tmp_path_factory, started) -> Path:
    import download
    import preprocess

    root = tmp_path_factory.mktemp("tiny_data")
    if MIRROR.is_file():
        download.main(str(MIRROR), str(root / "raw"))
    else:
        path = tmp_path_factory.mktemp("fake") / "cifar-10-python.tar.gz"
        download.main(str(path), str(root / "raw"), md5=make_cifar_archive(path))
    preprocess.main(
        str(root / "raw"),
        str(root / "tiny.npz"),
        str(root / "tiny.json"),
        subset_train=400,
        subset_val=100,
        subset_test=200,
    )
    return root / "tiny.npz"


@pytest.fixture(scope="session")
def tiny_data(started_early) -> Path:
    """A small preprocessed npz: real CIFAR-10 images when the mirror is there, else test-built ones.
    Made early (the resume matrix trains on it from the session's start)."""
    return started_early["tiny_data"].result()


@early("tiny_prepared")
def _tiny_prepared(tmp_path_factory, started) -> Path:
    work = tmp_path_factory.mktemp("tiny_prepared")
    snakemake(
        "results/tiny/data/cifar10.npz",
        "--directory",
        str(work),
        "--configfile",
        TINY,
        "--config",
        f"data_source={require_mirror()}",
        "--cores",
        "2",
    )
    return work


@pytest.fixture(scope="session")
def tiny_prepared(started_early) -> Path:
    """A working directory with the tiny preset's data stage done (download, preprocess), made once:
    a run started from a copy (copy_workdir keeps the files' times and Snakemake's records) plans
    neither again. Made early, at full priority (the first tests need it)."""
    return started_early["tiny_prepared"].result()


@early("full_data")
def _full_data(tmp_path_factory, started) -> Path:
    work = tmp_path_factory.mktemp("full_data")
    snakemake(
        "results/data/cifar10.npz",
        "--directory",
        str(work),
        "--cores",
        "2",
        "--config",
        f"data_source={require_mirror()}",
    )
    return work


@pytest.fixture(scope="session")
def full_data(started_early) -> Path:
    """A working directory holding the full-data .npz and its manifest (results/data/), as the
    workflow makes them: the published runs' data (their md5 is checked). Made early, at full
    priority: about 20 s of CPU, and the verify runs start from it (at nice 19 it was ready only
    after 8 minutes, and they ended in a tail of their own, one core idle)."""
    return started_early["full_data"].result()


@early("tiny_run", needs=("tiny_prepared",))
def _tiny_run(tmp_path_factory, started) -> dict:
    import copy

    import yaml

    from cnnstudy import configuration

    work = copy_workdir(started["tiny_prepared"].result(), tmp_path_factory.mktemp("tiny_run"))
    config = ["--config", f"data_source={require_mirror()}"]
    proc = snakemake(
        "--directory", str(work), "--configfile", TINY, *config, *TWO_AT_ONCE, timeout=until_session_end(), nice=10
    )
    with open(REPO / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    models = configuration.load(copy.deepcopy(cfg))
    return {"work": work, "config": config, "cfg": cfg, "models": models, "log": proc.stdout + proc.stderr}


# Two entries as the current code trains them on tiny_data (seed 1, one thread each), shared by
# three files: test_equivalence.py (its current-code side), the resume matrix (its uninterrupted
# references, test_resume.py) and model_17's TTA test (test_speed.py). Kind -> (entry, changes).
SHARED_RUNS = {
    # Reshuffles and an early stop (patience 1: it stopped after epoch 3 on an Intel Xeon, later
    # on an AMD EPYC; the matrix kills it after checkpoint 2).
    "early stopping": (
        "model_06",
        {"epochs": 8, "batch_size": 64, "early_stopping": {"patience": 1, "min_delta": 0.02}},
    ),
    # A schedule, weight EMA (momentum 0.5: over 3 epochs of 4 steps, 0.9 would stay near the
    # initial weights), TTA and the test accuracy after each epoch.
    "EMA + schedule": (
        "model_17",
        {"epochs": 3, "batch_size": 100, "time_to_accuracy": True, "optimizer": {"ema_momentum": 0.5}},
    ),
}


@early("shared_runs", needs=("tiny_data",))
def _shared_runs(tmp_path_factory, started) -> dict:
    ladder = load_ladder()
    data = started["tiny_data"].result()
    root = tmp_path_factory.mktemp("shared_runs")
    runs = {}
    for kind, (name, changes) in SHARED_RUNS.items():
        out = root / kind.replace(" ", "_").replace("+", "and")
        out.mkdir()
        spec = entry_with(ladder, name, **changes)
        (out / "spec.json").write_text(json.dumps(spec))
        runs[kind] = spec, out
    # At nice 5, the highest of the early work's: test_equivalence.py, the fifth file, reads them.
    side_by_side(
        {
            kind: ["nice", "-n", "5", *train_cli(data, out / "spec.json", out, seed=1)]
            for kind, (_, out) in runs.items()
        },
        root / "logs",
        timeout=until_session_end(),
    )
    return runs


@pytest.fixture(scope="session")
def shared_runs(started_early) -> dict:
    """Kind of SHARED_RUNS -> (its training spec, the folder of its outputs: model.keras,
    history.csv, train_info.json, spec.json), trained with seed 1 (made early)."""
    return started_early["shared_runs"].result()


@pytest.fixture(scope="session")
def tiny_run(started_early) -> dict:
    """The tiny preset, run once in a scratch working directory (made early); tests share the result."""
    return started_early["tiny_run"].result()


def train_cli(
    data: Path,
    spec: Path,
    out: Path,
    *,
    seed: int,
    threads: int = 1,
    state: Path | None = None,
    scripts: Path = SCRIPTS,
) -> list[str]:
    """The train script's command line as the train rule gives it: its outputs
    (model.keras, history.csv, train_info.json) in the folder ``out``, its training state in ``state``
    (default ``out/state``); ``scripts``: whose workflow_scripts/ (tests/test_equivalence.py's reference)."""
    outs = {"model": "model.keras", "history": "history.csv", "info": "train_info.json"}
    return [
        sys.executable,
        str(Path(scripts) / "train.py"),
        *("--data", str(data), "--spec", str(spec), "--seed", str(seed), "--threads", str(threads)),
        *(arg for k, name in outs.items() for arg in (f"--{k}-out", str(Path(out) / name))),
        *("--state-dir", str(state or Path(out) / "state")),
    ]


def saved_weights(model: Path) -> list[np.ndarray]:
    """The arrays of a saved .keras model's weights, in file order (bit-identity checks)."""
    import zipfile

    import h5py

    with zipfile.ZipFile(model) as archive, archive.open("model.weights.h5") as fh, h5py.File(fh) as h5:
        arrays = []
        h5.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return arrays


def saved_epoch(state_dir: Path) -> int:
    """The last epoch a training job's state directory holds a sealed checkpoint of (0: none)."""
    import re

    epochs = [int(m[1]) for p in Path(state_dir).glob("p*-e*") if (m := re.fullmatch(r"p\d+-e(\d+)", p.name))]
    return max(epochs, default=0)


def wait_for_epoch(state_dir: Path, epoch: int, proc, timeout: float) -> None:
    """Poll the job's state directory until the checkpoint after ``epoch`` is sealed (or proc ends)."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if saved_epoch(state_dir) >= epoch:
            return
        time.sleep(0.02)
