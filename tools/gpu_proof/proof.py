#!/usr/bin/env python3
"""The workflow's JAX path on a GPU, measured through its own job code (tools/gpu_proof/README.md).

Run by tools/gpu_proof/call.sh on the device, once per call; state is kept in --work (/tmp/proof)
while the machine stays warm, and every call writes everything measured so far to --out ($OUT):
summary.md, results.json, logs.tar.gz and proof.log. In priority order, each step within what is
left of the call's --budget (seconds), results saved after every job:

  a  every entry's training images/s through train.main (backend jax, the entry as configured, the
     first epochs on a subset), against keras_speed.time_phases(..., without_augmentation=True) (the
     network alone), in one process, entry after entry;
  b  model_17 seed 0, fully, through train.py and evaluate.py (as the Snakemake rules run them);
  c  the same job again: identical history, weights and metrics, or not (c2, off by default: if not,
     twice more for 2 epochs with XLA's --xla_gpu_deterministic_ops=true, which refuses max pooling);
  d  the published study's runs (reports/study/metrics), several train+evaluate jobs at once on the GPU.

Calls before the last one carry archive chunks; they measure (a) on a speed subset preprocessed from
the part of the archive that has arrived (data_batch_1: its images stand in for the missing batches).
The last call reassembles the archive, checks its sha256, runs download.main and preprocess.main
and goes on with (a)'s leftovers, (b), (c), (d).

Locally (CPU, tiny subsets): JAX_PLATFORMS=cpu /work/jaxenv/bin/python tools/gpu_proof/proof.py \\
    --work /tmp/proof-local --out /tmp/proof-local/out call --archive ../shared/data/cifar-10-python.tar.gz --tiny ...
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
import traceback
import zipfile
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SCRIPTS = REPO / "workflow_scripts"
SHA_FILE = HERE / "cifar-10-python.tar.gz.sha256"
TIMING = ("epoch_time", "images_per_s")
# (a)'s order: the rungs beyond the study and the study's best first, transfer entries (big compiles) last.
A_ORDER = [
    "model_17",
    "model_18",
    "model_10",
    "model_09",
    "model_11",
    "model_01",
    "model_02",
    "model_03",
    "model_04",
    "model_05",
    "model_06",
    "model_07",
    "model_08",
    "model_12",
    "model_16",
    "model_13",
    "model_14",
    "model_15",
]
log = logging.getLogger("proof")


# ---- small helpers --------------------------------------------------------------------------------------


def now() -> float:
    return time.time()


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def setup_logging(work: Path) -> None:
    (work / "logs").mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(name)s %(message)s", "%H:%M:%S")
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(work / "logs" / "proof.log")):
        handler.setFormatter(fmt)
        root.addHandler(handler)


class Clock:
    def __init__(self, budget: float):
        self.start, self.deadline = now(), now() + budget

    def left(self) -> float:
        return self.deadline - now()


# ---- state: results.json in --work, copied with summary.md to --out after every change -------------------


class State:
    def __init__(self, work: Path, out: Path | None):
        self.work, self.out = work, out
        self.path = work / "results.json"
        self.data = (
            json.loads(self.path.read_text())
            if self.path.is_file()
            else {"calls": [], "a": {"entries": {}, "attempts": {}}, "windows": {}}
        )

    def save(self) -> None:
        write_atomic(self.path, json.dumps(self.data, indent=1, sort_keys=True, default=str))
        write_atomic(self.work / "summary.md", summary(self.data))
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            for name in ("results.json", "summary.md"):
                shutil.copyfile(self.work / name, self.out / name)

    def __getitem__(self, key):
        return self.data[key]

    def __setitem__(self, key, value):
        self.data[key] = value


# ---- child processes: the environment of a job, TensorFlow watched ---------------------------------------

HOOK = '''
"""Records attempts to import TensorFlow and, at exit, whether it was loaded (tools/gpu_proof)."""
import atexit, os, sys

_LOG = os.environ.get("TF_IMPORT_LOG")


class _WatchTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if _LOG and name == "tensorflow":
            frame = sys._getframe(1)
            while frame and ("importlib" in frame.f_code.co_filename or "<frozen" in frame.f_code.co_filename):
                frame = frame.f_back
            where = f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame else "?"
            with open(_LOG, "a") as log:
                log.write(f"attempt\\t{os.getpid()}\\t{where}\\n")
        return None


sys.meta_path.insert(0, _WatchTensorFlow())
if _LOG:
    with open(_LOG, "a") as _log:
        _log.write(f"start\\t{os.getpid()}\\t{' '.join(sys.argv)[:160]}\\n")


def _at_exit():
    if not _LOG:
        return
    backend = None
    try:
        if "keras" in sys.modules:
            backend = sys.modules["keras"].backend.backend()
    except Exception:
        pass
    with open(_LOG, "a") as log:
        log.write(f"exit\\t{os.getpid()}\\t{' '.join(sys.argv)[:160]}\\ttensorflow_loaded={'tensorflow' in sys.modules}"
                  f"\\tkeras_backend={backend}\\n")


atexit.register(_at_exit)

# Chain to a sitecustomize this one shadows, if any.
try:
    import importlib.machinery, importlib.util
    _here = os.path.dirname(os.path.abspath(__file__))
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", [p for p in sys.path if os.path.abspath(p or ".") != _here])
    if _spec is not None:
        _module = importlib.util.module_from_spec(_spec)
        _spec.loader.exec_module(_module)
except Exception:
    pass
'''


def child_env(work: Path, keras_jax: bool = False, extra: dict | None = None) -> dict:
    env = dict(os.environ)
    hook = work / "hook"
    hook.mkdir(parents=True, exist_ok=True)
    (hook / "sitecustomize.py").write_text(HOOK)
    env["PYTHONPATH"] = os.pathsep.join([str(hook), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["TF_IMPORT_LOG"] = str(work / "logs" / "tf_imports.log")
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    env["PYTHONUNBUFFERED"] = "1"
    # As Snakemake runs the jobs: they choose the backend from their spec (train) or its info (evaluate).
    env.pop("KERAS_BACKEND", None)
    if keras_jax:
        env["KERAS_BACKEND"] = "jax"
    env.update(extra or {})
    return env


class Proc:
    """A child process in its own session (killed with everything it started), output to a log file."""

    def __init__(self, argv: list[str], log_path: Path, env: dict):
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path, self.argv = log_path, [str(a) for a in argv]
        self.fh = open(log_path, "w")
        self.fh.write("$ " + " ".join(self.argv) + "\n")
        self.fh.flush()
        self.start = now()
        self.proc = subprocess.Popen(
            self.argv, stdout=self.fh, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True
        )
        self.end, self.killed = None, False

    def poll(self):
        rc = self.proc.poll()
        if rc is not None and self.end is None:
            self.end = now()
            self.fh.close()
        return rc

    def kill(self) -> None:
        if self.poll() is not None:
            return
        self.killed = True
        for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        self.poll()

    def wait(self, deadline: float) -> int | None:
        while self.poll() is None:
            if now() >= deadline:
                self.kill()
                break
            time.sleep(0.2)
        return self.proc.returncode

    @property
    def wall(self) -> float:
        return (self.end or now()) - self.start


EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) .*?([\d.]+) s\s+(\d+) img/s")
TEST_LINE = re.compile(r"epoch (\d+)\s+test_accuracy ([\d.]+)")


def progress(log_path: Path) -> dict:
    """What a (possibly killed) training job's log says: epochs done, their seconds and img/s."""
    text = log_path.read_text(errors="replace") if log_path.is_file() else ""
    epochs = [
        {"epoch": int(m[1]), "of": int(m[2]), "epoch_time": float(m[3]), "images_per_s": float(m[4])}
        for m in EPOCH_LINE.finditer(text)
    ]
    tests = {int(m[1]): float(m[2]) for m in TEST_LINE.finditer(text)}
    for row in epochs:
        if row["epoch"] in tests:
            row["test_accuracy"] = tests[row["epoch"]]
    errors = [line for line in text.splitlines() if " ERROR " in line or line.startswith(("Traceback", "ERROR"))]
    tail = text.splitlines()[-15:]
    return {
        "epochs_done": len(epochs),
        "epochs": epochs,
        "errors": errors[:5],
        "log_tail": tail if errors or not epochs else [],
    }


# ---- GPU sampling: nvidia-smi every second, in a thread of this process -----------------------------------


class GpuSampler(threading.Thread):
    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.samples, self.stop = path, [], threading.Event()
        self.ok = shutil.which("nvidia-smi") is not None

    def run(self):
        if not self.ok:
            return
        with open(self.path, "a") as fh:
            while not self.stop.is_set():
                try:
                    out = subprocess.run(
                        [
                            "nvidia-smi",
                            "--query-gpu=utilization.gpu,memory.used,power.draw",
                            "--format=csv,noheader,nounits",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=5,
                    ).stdout
                    util, mem, power = (
                        float(v) if v.strip() not in ("[N/A]", "N/A") else None for v in out.splitlines()[0].split(",")
                    )
                    self.samples.append((now(), util, mem, power))
                    fh.write(f"{now():.1f},{util},{mem},{power}\n")
                    fh.flush()
                except Exception:  # noqa: BLE001 (sampling is best effort)
                    pass
                self.stop.wait(1.0)

    def stats(self, t0: float, t1: float) -> dict | None:
        rows = [s for s in self.samples if t0 <= s[0] <= t1]
        if not rows:
            return None
        util = [r[1] for r in rows if r[1] is not None]
        mem = [r[2] for r in rows if r[2] is not None]
        return {
            "samples": len(rows),
            "util_mean": round(statistics.mean(util), 1) if util else None,
            "util_max": max(util) if util else None,
            "mem_max_mib": max(mem) if mem else None,
        }


class Window:
    """Times a step; records its GPU use."""

    def __init__(self, state: State, sampler: GpuSampler, name: str):
        self.state, self.sampler, self.name = state, sampler, name

    def __enter__(self):
        self.t0 = now()
        log.info("== step %s", self.name)
        return self

    def __exit__(self, *exc):
        t1 = now()
        self.state["windows"].setdefault(self.name, []).append(
            {
                "call": self.state["calls"][-1]["index"],
                "seconds": round(t1 - self.t0, 1),
                "gpu": self.sampler.stats(self.t0, t1),
            }
        )
        self.state.save()
        return False


# ---- data: chunks, the archive, download.main / preprocess.main ---------------------------------------------


def import_workflow():
    for folder in (SCRIPTS, REPO / "tools"):  # the job scripts and cnnstudy; keras_speed
        if str(folder) not in sys.path:
            sys.path.insert(0, str(folder))


def take_chunk(state: State, work: Path, chunk: Path) -> None:
    manifest = json.loads((chunk / "manifest.json").read_text())
    dest = work / "chunks" / f"{manifest['index']:02d}.part"
    dest.parent.mkdir(parents=True, exist_ok=True)
    record = state.data.setdefault(
        "chunks", {"count": manifest["count"], "archive_sha256": manifest["archive_sha256"], "have": {}}
    )
    if record["archive_sha256"] != manifest["archive_sha256"]:  # a new plan: start afresh
        shutil.rmtree(dest.parent)
        dest.parent.mkdir()
        record = state["chunks"] = {
            "count": manifest["count"],
            "archive_sha256": manifest["archive_sha256"],
            "have": {},
        }
    key = str(manifest["index"])
    if key in record["have"] and dest.is_file() and dest.stat().st_size == manifest["size"]:
        log.info("chunk %d/%d already here: skipped", manifest["index"], manifest["count"])
        return
    tmp = dest.with_suffix(".tmp")
    shutil.copyfile(chunk / "part", tmp)
    got = sha256_file(tmp)
    if got != manifest["sha256"]:
        tmp.unlink()
        raise SystemExit(
            f"chunk {manifest['index']}: sha256 {got}, expected {manifest['sha256']}: carried file damaged"
        )
    os.replace(tmp, dest)
    record["have"][key] = {"size": manifest["size"], "sha256": got, "call": state["calls"][-1]["index"]}
    log.info(
        "chunk %d/%d taken in (%d bytes, sha256 ok); chunks here: %s",
        manifest["index"],
        manifest["count"],
        manifest["size"],
        sorted(int(k) for k in record["have"]),
    )


def expected_sha256() -> str | None:
    return SHA_FILE.read_text().split()[0] if SHA_FILE.is_file() else None


def assemble(state: State, work: Path) -> Path | None:
    """The whole archive, once every chunk is here, its sha256 checked; None before."""
    record = state.data.get("chunks")
    if not record:
        return None
    missing = [i for i in range(1, record["count"] + 1) if str(i) not in record["have"]]
    if missing:
        earlier = [i for i in missing if i < state["calls"][-1]["index"]]
        if earlier:
            log.warning(
                "chunk(s) %s missing: the machine was not warm from call 1 on (given back between calls?); "
                "the archive can't be assembled in this machine: run the calls again from call 1",
                earlier,
            )
        return None
    archive = work / "cifar-10-python.tar.gz"
    info = state.data.get("archive")
    if info and info.get("ok") and archive.is_file():
        return archive
    t0 = now()
    with open(archive, "wb") as out:
        for i in range(1, record["count"] + 1):
            with open(work / "chunks" / f"{i:02d}.part", "rb") as fh:
                shutil.copyfileobj(fh, out, 1 << 22)
    got, want = sha256_file(archive), expected_sha256() or record["archive_sha256"]
    state["archive"] = {
        "path": str(archive),
        "size": archive.stat().st_size,
        "sha256": got,
        "expected": want,
        "ok": got == want,
        "expected_from": SHA_FILE.name if expected_sha256() else "chunk manifest",
        "seconds": round(now() - t0, 1),
    }
    state.save()
    if got != want:
        log.error("archive sha256 %s, expected %s: not used", got, want)
        return None
    log.info("archive reassembled from %d chunks, sha256 %s ok (%.1f s)", record["count"], got, now() - t0)
    return archive


class _Concat(io.RawIOBase):
    def __init__(self, paths):
        self.files = [open(p, "rb") for p in paths]

    def readable(self):
        return True

    def readinto(self, buffer):
        while self.files:
            n = self.files[0].readinto(buffer)
            if n:
                return n
            self.files.pop(0).close()
        return 0


def prefix_raw(work: Path) -> dict | None:
    """A raw directory from the chunks here so far (leading, contiguous): every complete, md5-checked
    member of the archive's first part; each missing batch replaced by a link to data_batch_1."""
    import_workflow()
    from cnnstudy import cifar

    have = sorted(int(p.stem) for p in (work / "chunks").glob("*.part"))
    lead = [i for n, i in enumerate(have, start=1) if i == n]
    if not lead:
        return None
    raw = work / "prefix_raw"
    shutil.rmtree(raw, ignore_errors=True)
    raw.mkdir(parents=True)
    found = []
    try:
        with tarfile.open(
            fileobj=io.BufferedReader(_Concat([work / "chunks" / f"{i:02d}.part" for i in lead])), mode="r|gz"
        ) as tar:
            for member in tar:
                name = Path(member.name).name
                if name not in cifar.MD5 or not member.isfile():
                    continue
                data = tar.extractfile(member).read()
                if len(data) != member.size or hashlib.md5(data).hexdigest() != cifar.MD5[name]:
                    break
                (raw / name).write_bytes(data)
                found.append(name)
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError):
        pass  # the end of what has arrived
    if "data_batch_1" not in found or cifar.META not in found:
        return None
    for name in cifar.MD5:
        if name not in found:
            os.symlink("data_batch_1", raw / name)
    return {"raw": str(raw), "chunks": lead, "members": found}


def speed_data(state: State, work: Path, opts) -> Path | None:
    """(a)'s data: a stratified subset by preprocess.main, from the full raw files or the archive's prefix."""
    npz = work / "data" / "speed.npz"
    if npz.is_file() and state.data.get("speed_data"):
        return npz
    import_workflow()
    import preprocess

    full = work / "raw"
    if (state.data.get("data") or {}).get("raw_ok"):
        source = {"raw": str(full), "from": "the whole archive"}
    else:
        prefix = prefix_raw(work)
        if prefix is None:
            log.warning("(a): no data yet (chunk 1 missing?)")
            return None
        source = {
            **prefix,
            "from": f"the archive's first {len(prefix['chunks'])} chunk(s): {', '.join(prefix['members'])}; "
            "missing batches replaced by data_batch_1 (speed only)",
        }
    t0 = now()
    info = preprocess.main(
        source["raw"],
        str(npz),
        str(work / "data" / "speed.json"),
        subset_train=opts.a_train,
        subset_val=opts.a_val,
        subset_test=opts.a_test,
    )
    state["speed_data"] = {
        **source,
        "counts": info["counts"],
        "seconds": round(now() - t0, 1),
        "call": state["calls"][-1]["index"],
    }
    state.save()
    log.info("(a) data: %s, %s", info["counts"], source["from"])
    return npz


def step_data(state: State, work: Path, archive: Path, opts) -> bool:
    if (state.data.get("data") or {}).get("npz_ok"):
        return True
    import_workflow()
    import download
    import preprocess

    record = state.data.setdefault("data", {})
    t0 = now()
    download.main(str(archive), str(work / "raw"))
    record.update(raw_ok=True, download_s=round(now() - t0, 1))
    t0 = now()
    info = preprocess.main(
        str(work / "raw"),
        str(work / "data" / "cifar10.npz"),
        str(work / "data" / "cifar10.json"),
        subset_train=opts.subset_train,
        subset_val=opts.subset_val,
        subset_test=opts.subset_test,
    )
    record.update(npz_ok=True, preprocess_s=round(now() - t0, 1), counts=info["counts"], md5=info["md5"])
    state.save()
    log.info(
        "data: download.main %.1f s, preprocess.main %.1f s, %s",
        record["download_s"],
        record["preprocess_s"],
        info["counts"],
    )
    return True


# ---- specs: what the spec rule writes for backend jax --------------------------------------------------------


def write_specs(work: Path, config_path: Path) -> dict:
    """results/specs/<model>.json as rules/train.smk's spec rule writes it with `backend: jax`
    (common.smk's training_spec), and the resolved entries. (a)'s copies of transfer entries start from
    random weights: the device has no ImageNet files and no network."""
    import_workflow()
    import yaml

    from cnnstudy import configuration

    with open(config_path) as fh:
        config = yaml.safe_load(fh)
    config["backend"] = "jax"  # as `--config backend=jax`
    models = configuration.load(config)
    for name, entry in models.items():
        spec = configuration.training_part(entry)
        if config["backend"] != "tensorflow":
            spec["backend"] = config["backend"]
        write_atomic(work / "specs" / f"{name}.json", json.dumps(spec, sort_keys=True, indent=1) + "\n")
        if configuration.weights_source(spec) == "imagenet":
            spec = {**spec, "backbone": {**spec["backbone"], "weights": "none"}}
        write_atomic(work / "specs" / "a" / f"{name}.json", json.dumps(spec, sort_keys=True, indent=1) + "\n")
    return models


# ---- (a): the job's path against the network alone, in one worker process ----------------------------------


def worker_a(args) -> int:
    """Entry after entry: train.main (the job), then keras_speed.time_phases without augmentation."""
    import_workflow()
    import gc

    from cnnstudy import cli

    cli.setup_logging()
    import keras_speed
    import pandas as pd
    import train

    out = Path(args.rows)
    peak_done = False

    def emit(row):
        with open(out, "a") as fh:
            fh.write(json.dumps(row, default=str) + "\n")
            fh.flush()

    for item in args.entries:
        name, _, parts = item.partition("=")
        parts = parts.split(",") if parts else ["job", "net"]
        spec_file = Path(args.specs) / f"{name}.json"
        spec = json.loads(spec_file.read_text())
        need = 45 if spec.get("backbone") else 15
        if args.deadline - now() < need:
            log.info("(a) %s: %.0f s left, not started", name, args.deadline - now())
            break
        folder = Path(args.folder) / name
        precision = None
        if "job" in parts:
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
            t0 = now()
            try:
                info = train.main(
                    str(args.data),
                    str(spec_file),
                    str(folder / "model.keras"),
                    str(folder / "history.csv"),
                    str(folder / "train_info.json"),
                    str(folder / "state"),
                    seed=0,
                    threads=args.threads,
                    stop_after_epoch=args.epochs,
                )
                hist = pd.read_csv(folder / "history.csv")
                ips, times = hist["images_per_s"].tolist(), hist["epoch_time"].tolist()
                precision = info["precision"]
                emit(
                    {
                        "entry": name,
                        "part": "job",
                        "wall_s": now() - t0,
                        "epochs": len(hist),
                        "images_per_epoch": info["images_per_epoch"],
                        "batch_size": spec["batch_size"],
                        "images_per_s": ips,
                        "epoch_time": times,
                        "images_per_s_median_later": median(ips[1:]) if len(ips) > 1 else None,
                        "first_epoch_s": times[0],
                        "precision": precision,
                        "jit_compile": info["jit_compile"],
                        "device": info["device"].get("name"),
                        "weights": (spec.get("backbone") or {}).get("weights"),
                    }
                )
            except Exception as exc:  # noqa: BLE001 (recorded; the next entry goes on)
                emit(
                    {
                        "entry": name,
                        "part": "job",
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
        if "net" in parts:
            import keras

            keras.backend.clear_session()
            gc.collect()
            if precision is None:  # as the job resolves 'auto' on this device
                import jax

                precision = "mixed_bfloat16" if jax.devices()[0].platform == "gpu" else "float32"
            if args.peak_size and not peak_done:
                peak_done = True
                emit({"entry": "_peak", "part": "peak", **matmul_peak(precision, args.peak_size)})
            try:
                images = max(args.images, spec["batch_size"])
                rows = keras_speed.time_phases(spec, images, args.rounds, precision, without_augmentation=True)
                emit(
                    {
                        "entry": name,
                        "part": "net",
                        "precision": precision,
                        "images": images,
                        "rounds": args.rounds,
                        "phases": rows,
                        "images_per_s": rows[0]["train img/s"],
                        "warm_up_s": rows[0]["warm-up s"],
                        "train_gflop_per_image": rows[0].get("train GFLOP/img"),
                    }
                )
            except Exception as exc:  # noqa: BLE001
                emit(
                    {
                        "entry": name,
                        "part": "net",
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc()[-3000:],
                    }
                )
        import keras

        keras.backend.clear_session()
        gc.collect()
    return 0


def matmul_peak(precision: str, size: int) -> dict:
    """The machine's peak as the workflow measures it (cnnstudy.flops, keras_speed): Keras ops only."""
    import inspect

    import_workflow()
    dtype = "float32" if precision == "float32" else precision.removeprefix("mixed_")
    from cnnstudy import flops

    candidates = [flops] + ([sys.modules["keras_speed"]] if "keras_speed" in sys.modules else [])
    for module in candidates:
        function = getattr(module, "matmul_peak", None)
        if function is None or "tensorflow" in inspect.getsource(function):
            continue  # a TensorFlow version: not on this path
        try:
            return {
                "dtype": dtype,
                "size": size,
                "flops_per_s": function(dtype, size),
                "from": f"{module.__name__}.matmul_peak",
            }
        except Exception as exc:  # noqa: BLE001
            return {"dtype": dtype, "size": size, "error": f"{type(exc).__name__}: {exc}"}
    return {"dtype": dtype, "size": size, "error": "no Keras matmul_peak in cnnstudy.flops or keras_speed"}


def step_a(state: State, work: Path, npz: Path, clock: Clock, cap: float | None, opts, sampler) -> None:
    a = state["a"]
    wanted = [m for m in (opts.a_models or A_ORDER)]
    todo = []
    for name in wanted:
        entry = a["entries"].get(name, {})
        if entry.get("job", {}).get("error") or entry.get("net", {}).get("error"):
            continue  # failed: recorded, not retried
        parts = [p for p in ("job", "net") if p not in entry]
        if parts:
            todo.append((a["attempts"].get(name, 0), wanted.index(name), name, parts))
    if not todo:
        log.info("(a): every entry measured")
        return
    todo.sort()  # entries cut short before go last
    budget = clock.left() - opts.reserve
    if cap is not None:
        budget = min(budget, cap)
    if budget < 20:
        log.info("(a): %.0f s left: skipped (%d entries to go)", budget, len(todo))
        return
    deadline = now() + budget
    rows_path = work / "a" / "rows.jsonl"
    rows_path.parent.mkdir(parents=True, exist_ok=True)
    seen = rows_path.read_text().count("\n") if rows_path.is_file() else 0
    call = state["calls"][-1]["index"]
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "worker-a",
        "--data",
        npz,
        "--specs",
        work / "specs" / "a",
        "--folder",
        work / "a",
        "--rows",
        rows_path,
        "--deadline",
        str(deadline),
        "--threads",
        str(opts.threads),
        "--epochs",
        str(opts.a_epochs),
        "--images",
        str(opts.a_images),
        "--rounds",
        str(opts.a_rounds),
        "--peak-size",
        str(0 if state.data.get("peak") else opts.peak_size),
        "--entries",
        *[f"{name}={','.join(parts)}" for *_, name, parts in todo],
    ]
    log.info("(a): %.0f s for %s", budget, ", ".join(name for *_, name, _ in todo))
    proc = Proc(argv, work / "logs" / f"a_call{call}_{int(now())}.log", child_env(work, keras_jax=True))
    rc = proc.wait(deadline)
    if rc not in (0, None) and not proc.killed:
        a.setdefault("worker_errors", []).append(
            {"call": call, "rc": rc, "log_tail": proc.log_path.read_text(errors="replace").splitlines()[-20:]}
        )
        log.error("(a): the worker failed (rc %s): %s", rc, "\n".join(a["worker_errors"][-1]["log_tail"][-8:]))
    lines = rows_path.read_text().splitlines()[seen:] if rows_path.is_file() else []
    touched = set()
    for line in lines:
        row = json.loads(line)
        if row["part"] == "peak":
            state["peak"] = {**row, "call": call}
            continue
        row["call"] = call
        row["data"] = state["speed_data"]["from"]
        a["entries"].setdefault(row["entry"], {})[row["part"]] = row
        touched.add(row["entry"])
        entry = a["entries"][row["entry"]]
        if "job" in entry and "net" in entry and "error" not in entry["job"] and "error" not in entry["net"]:
            job, net = entry["job"]["images_per_s_median_later"], entry["net"]["images_per_s"]
            entry["ratio"] = job / net if job and net else None
            log.info(
                "(a) %s: job %.0f img/s, network alone %.0f img/s, ratio %.3f",
                row["entry"],
                job or 0,
                net or 0,
                entry["ratio"] or 0,
            )
    for *_, name, parts in todo:  # started but not finished: tried once more, last
        entry = a["entries"].get(name, {})
        if any(p not in entry for p in parts) and (name in touched or proc.killed):
            a["attempts"][name] = a["attempts"].get(name, 0) + 1
    if proc.killed:
        log.info("(a): worker stopped at its deadline after %.0f s", proc.wall)
    state.save()


# ---- (b), (c), (d): jobs as the Snakemake rules run them ----------------------------------------------------


def train_argv(data: Path, spec: Path, folder: Path, seed: int, threads: int, stop_after: int | None) -> list:
    argv = [
        sys.executable,
        SCRIPTS / "train.py",
        "--data",
        data,
        "--spec",
        spec,
        "--model-out",
        folder / "model.keras",
        "--history-out",
        folder / "history.csv",
        "--info-out",
        folder / "train_info.json",
        "--state-dir",
        folder / "state",
        "--seed",
        seed,
        "--threads",
        threads,
        "--precision",
        "auto",
        "--require-gpu",
        "auto",
        "--deterministic-ops",
        "true",
    ]
    return argv + (["--stop-after-epoch", stop_after] if stop_after else [])


def evaluate_argv(data: Path, manifest: Path, folder: Path, tta: str) -> list:
    return [
        sys.executable,
        SCRIPTS / "evaluate.py",
        "--data",
        data,
        "--manifest",
        manifest,
        "--model",
        folder / "model.keras",
        "--history",
        folder / "history.csv",
        "--train-info",
        folder / "train_info.json",
        "--metrics-out",
        folder / "metrics.json",
        "--probs-out",
        folder / "test_probs.npz",
        "--tta",
        tta,
        "--threads",
        "2",
    ]


def history_summary(folder: Path) -> dict:
    import pandas as pd

    hist = pd.read_csv(folder / "history.csv")
    times, ips = hist["epoch_time"].tolist(), hist["images_per_s"].tolist()
    later = times[1:]
    result = {
        "epochs": len(hist),
        "epoch_time": [round(t, 3) for t in times],
        "images_per_s": [round(v, 1) for v in ips],
        "first_epoch_s": times[0],
        "later_epoch_s_median": median(later),
        "later_epochs_s": sum(later),
        "compile_s_estimate": times[0] - median(later) if later else None,
        "images_per_s_median_later": median(ips[1:]) if len(ips) > 1 else ips[0],
        "train_seconds": sum(times),
    }
    if "test_accuracy" in hist:
        result["test_accuracy_per_epoch"] = hist["test_accuracy"].tolist()
    info = json.loads((folder / "train_info.json").read_text())
    result.update(
        {
            k: info.get(k)
            for k in (
                "kept_epoch",
                "stopped_early",
                "epochs_run",
                "epochs_requested",
                "precision",
                "jit_compile",
                "n_train",
                "images_per_epoch",
            )
        }
    )
    result["device"] = (info.get("device") or {}).get("name")
    result["resumed_from_epoch"] = info.get("resumed_from_epoch")
    return result


def metrics_summary(folder: Path) -> dict:
    m = json.loads((folder / "metrics.json").read_text())
    return {
        "test_accuracy": m["test"]["accuracy"],
        "test_loss": m["test"]["loss"],
        "val_accuracy": (m.get("val") or {}).get("accuracy"),
        "eval_images_per_s": m.get("eval_images_per_s"),
        "accuracy_without_tta": m["test"].get("accuracy_without_tta"),
    }


class Run:
    """One train job, then its evaluate job (as rules train and evaluate), in ``folder``."""

    def __init__(self, work, name, model, seed, data, manifest, spec, tta, threads, stop_after=None, env_extra=None):
        self.work, self.name, self.model, self.seed = work, name, model, seed
        self.data, self.manifest, self.spec, self.tta = data, manifest, spec, tta
        self.folder = work / "runs" / name
        self.threads, self.stop_after, self.env_extra = threads, stop_after, env_extra
        self.train = self.evaluate = None
        self.record = {"model": model, "seed": seed, "status": "waiting"}

    def start_train(self):
        state = self.folder / "state"
        if state.is_dir() and any(state.iterdir()):  # stopped at an earlier call's deadline: train.py resumes it
            for path in self.folder.iterdir():
                if path != state:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
            self.record["resumed"] = True
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.record.update(status="training", started=now())
        self.train = Proc(
            train_argv(self.data, self.spec, self.folder, self.seed, self.threads, self.stop_after),
            self.work / "logs" / f"{self.name}.train.log",
            child_env(self.work, extra=self.env_extra),
        )

    def start_evaluate(self):
        self.record["status"] = "evaluating"
        self.evaluate = Proc(
            evaluate_argv(self.data, self.manifest, self.folder, self.tta),
            self.work / "logs" / f"{self.name}.evaluate.log",
            child_env(self.work, extra=self.env_extra),
        )

    def step(self, can_start_evaluate: bool = True) -> bool:
        """Advance; True once finished (done, failed or stopped)."""
        if self.train is None:
            return False
        if self.evaluate is None:
            rc = self.train.poll()
            if rc is None:
                return False
            self.record["train_wall_s"] = round(self.train.wall, 2)
            self.record["train_rc"] = rc
            if rc != 0:
                self.record.update(status="train failed", progress=progress(self.train.log_path))
                return True
            self.record["history"] = history_summary(self.folder)
            if not can_start_evaluate:
                self.record["status"] = "trained, not evaluated (time)"
                return True
            self.start_evaluate()
            return False
        rc = self.evaluate.poll()
        if rc is None:
            return False
        self.record["evaluate_wall_s"] = round(self.evaluate.wall, 2)
        self.record["evaluate_rc"] = rc
        if rc != 0:
            self.record.update(
                status="evaluate failed",
                evaluate_log_tail=self.evaluate.log_path.read_text(errors="replace").splitlines()[-15:],
            )
            return True
        self.record.update(
            status="done", metrics=metrics_summary(self.folder), wall_s=round(now() - self.record["started"], 2)
        )
        return True

    def stop(self):
        for proc in (self.train, self.evaluate):
            if proc is not None:
                proc.kill()
        if self.train is not None and self.record["status"] == "training":
            self.record.update(
                status="stopped at the deadline",
                train_wall_s=round(self.train.wall, 2),
                progress=progress(self.train.log_path),
            )
        elif self.record["status"] == "evaluating":
            self.record["status"] = "stopped while evaluating"

    def run(self, deadline: float, evaluate: bool = True) -> dict:
        self.start_train()
        while not self.step(can_start_evaluate=evaluate):
            if now() >= deadline:
                self.stop()
                break
            time.sleep(0.2)
        return self.record


def compare(a: Path, b: Path, epochs: int | None = None) -> dict:
    """Same history (timing columns aside), weights, metrics and test probabilities, or where they differ."""
    import numpy as np
    import pandas as pd

    result = {}
    ha = pd.read_csv(a / "history.csv").drop(columns=list(TIMING))
    hb = pd.read_csv(b / "history.csv").drop(columns=list(TIMING))
    if epochs is not None:
        ha, hb = ha[ha["epoch"] <= epochs].reset_index(drop=True), hb[hb["epoch"] <= epochs].reset_index(drop=True)
    result["epochs_compared"] = int(min(len(ha), len(hb)))
    same = list(ha.columns) == list(hb.columns) and len(ha) == len(hb) and ha.equals(hb)
    result["history_identical"] = bool(same)
    if not same and list(ha.columns) == list(hb.columns):
        n = min(len(ha), len(hb))
        for i in range(n):
            diff = [
                c
                for c in ha.columns
                if not (ha[c].iloc[i] == hb[c].iloc[i] or (pd.isna(ha[c].iloc[i]) and pd.isna(hb[c].iloc[i])))
            ]
            if diff:
                result["first_difference"] = {
                    "epoch": int(ha["epoch"].iloc[i]),
                    "columns": diff,
                    "values": {c: [float(ha[c].iloc[i]), float(hb[c].iloc[i])] for c in diff[:4]},
                }
                break
        numeric = [c for c in ha.columns if c != "epoch"]
        result["max_abs_difference"] = {
            c: float(np.max(np.abs(ha[c].to_numpy(float)[:n] - hb[c].to_numpy(float)[:n]))) for c in numeric
        }
    if epochs is None:
        wa, wb = model_weights(a / "model.keras"), model_weights(b / "model.keras")
        differing = [
            i for i, (x, y) in enumerate(zip(wa, wb, strict=False)) if x.shape != y.shape or not np.array_equal(x, y)
        ]
        result["weights_identical"] = len(wa) == len(wb) and not differing
        result["weight_arrays"] = len(wa)
        if differing:
            result["weight_arrays_differing"] = len(differing)
            same_shape = [
                float(np.max(np.abs(wa[i].astype(float) - wb[i].astype(float))))
                for i in differing
                if wa[i].shape == wb[i].shape
            ]
            result["weights_max_abs_difference"] = max(same_shape) if same_shape else None
        if (a / "metrics.json").is_file() and (b / "metrics.json").is_file():
            ma, mb = json.loads((a / "metrics.json").read_text()), json.loads((b / "metrics.json").read_text())
            result["test_accuracy"] = [ma["test"]["accuracy"], mb["test"]["accuracy"]]
            result["metrics_identical"] = ma["test"] == mb["test"] and ma.get("val") == mb.get("val")
            with np.load(a / "test_probs.npz") as pa, np.load(b / "test_probs.npz") as pb:
                result["test_probs_identical"] = bool(np.array_equal(pa["probs"], pb["probs"]))
    result["identical"] = bool(
        result["history_identical"]
        and result.get("weights_identical", True)
        and result.get("metrics_identical", True)
        and result.get("test_probs_identical", True)
    )
    return result


def model_weights(path: Path) -> list:
    import h5py

    with zipfile.ZipFile(path) as archive, archive.open("model.weights.h5") as fh, h5py.File(fh) as h5:
        arrays = []
        h5.visititems(lambda _, obj: arrays.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return arrays


def step_b(state, work, models, clock, opts) -> None:
    status = (state.data.get("b") or {}).get("status", "")
    if status == "done" or "failed" in status:  # a failure is recorded, not retried
        return
    if clock.left() - opts.reserve < 30:
        log.info("(b): too little time left")
        return
    data = work / "data" / "cifar10.npz"
    run = Run(
        work,
        f"b_{opts.b_model}_seed{opts.b_seed}",
        opts.b_model,
        opts.b_seed,
        data,
        work / "data" / "cifar10.json",
        work / "specs" / f"{opts.b_model}.json",
        models[opts.b_model]["tta"],
        opts.threads,
        opts.stop_after,
    )
    log.info(
        "(b): %s seed %d, %s",
        opts.b_model,
        opts.b_seed,
        f"stopped after epoch {opts.stop_after}" if opts.stop_after else "all its epochs",
    )
    record = run.run(clock.deadline - opts.reserve)
    record["folder"] = str(run.folder)
    state["b"] = record
    state.save()
    h = record.get("history") or {}
    log.info(
        "(b): %s; train job %.1f s, epochs after the first %.1f s, first epoch %.1f s, test accuracy %s",
        record["status"],
        record.get("train_wall_s") or 0,
        h.get("later_epochs_s") or 0,
        h.get("first_epoch_s") or 0,
        (record.get("metrics") or {}).get("test_accuracy"),
    )


def step_c(state, work, models, clock, opts) -> None:
    b = state.data.get("b") or {}
    if (
        b.get("status") != "done"
        or (state.data.get("c") or {}).get("status") == "done"
        or "failed" in (state.data.get("c") or {}).get("status", "")
    ):
        return
    h = b["history"]
    left = clock.left() - opts.reserve
    full = (b["wall_s"]) * 1.15 + 10
    epochs = None
    if left < full:
        per_epoch = h["later_epoch_s_median"] or h["first_epoch_s"]
        startup = b["train_wall_s"] - h["train_seconds"]  # process start, build, checkpoints, evaluated accuracy
        epochs = int((left - 10 - startup - h["first_epoch_s"]) // per_epoch) + 1
        epochs = min(epochs, h["epochs"] - 1)
        if epochs < 1:
            log.info("(c): %.0f s left, not enough for one epoch of the rerun", left)
            return
    run = Run(
        work,
        f"c_{opts.b_model}_seed{opts.b_seed}",
        opts.b_model,
        opts.b_seed,
        work / "data" / "cifar10.npz",
        work / "data" / "cifar10.json",
        work / "specs" / f"{opts.b_model}.json",
        models[opts.b_model]["tta"],
        opts.threads,
        epochs or opts.stop_after,
    )
    log.info("(c): the same job again, %s", f"its first {epochs} epoch(s) (time)" if epochs else "whole")
    record = run.run(clock.deadline - opts.reserve, evaluate=not epochs)
    if record["status"] == "done" or (epochs and record["status"].startswith("trained")):
        record["comparison"] = compare(Path(b["folder"]), run.folder, epochs)
        record["status"] = "done"
        log.info("(c): identical: %s (%s)", record["comparison"]["identical"], json.dumps(record["comparison"])[:300])
    state["c"] = record
    state.save()


def step_c2(state, work, models, clock, opts) -> None:
    """(c) found a difference: the same job twice for 2 epochs with XLA's deterministic-ops flag."""
    c = state.data.get("c") or {}
    if c.get("status") != "done" or c["comparison"]["identical"] or state.data.get("c2") or opts.c2_cap <= 0:
        return
    b = state["b"]["history"]
    need = (
        2 * (state["b"]["train_wall_s"] - b["train_seconds"] + b["first_epoch_s"] + (b["later_epoch_s_median"] or 0))
        + 10
    )
    budget = min(opts.c2_cap, clock.left() - opts.reserve)
    if budget < need:
        log.info("(c2): %.0f s available, ~%.0f s needed: skipped", budget, need)
        return
    deadline = now() + budget
    flags = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()}
    runs = [
        Run(
            work,
            f"c2_{opts.b_model}_{i}",
            opts.b_model,
            opts.b_seed,
            work / "data" / "cifar10.npz",
            work / "data" / "cifar10.json",
            work / "specs" / f"{opts.b_model}.json",
            models[opts.b_model]["tta"],
            opts.threads,
            2,
            flags,
        )
        for i in (1, 2)
    ]
    records = []
    for run in runs:
        run.evaluate = None
        run.start_train()
        while run.train.poll() is None and now() < deadline:
            time.sleep(0.2)
        run.train.kill()
        records.append(
            {
                "rc": run.train.proc.returncode,
                "wall_s": round(run.train.wall, 1),
                "progress": progress(run.train.log_path),
            }
        )
    result = {"xla_flags": flags["XLA_FLAGS"], "runs": records}
    if all(r["rc"] == 0 for r in records):
        result["comparison"] = compare(runs[0].folder, runs[1].folder, 2)
        log.info("(c2): with --xla_gpu_deterministic_ops=true, identical: %s", result["comparison"]["identical"])
    state["c2"] = result
    state.save()


def published_runs() -> list[tuple[str, int]]:
    """The published study's holdout runs (model, seed); the protocol runs beside them
    (``model_10__protocol-refit``: cnnstudy.protocols) are left out, their entries derived, not in config.yaml."""
    runs = []
    for path in sorted((REPO / "reports" / "study" / "metrics").glob("*_seed*.json")):
        model, seed = re.fullmatch(r"(.+)_seed(\d+)", path.stem).groups()
        if "__protocol-" not in model:
            runs.append((model, int(seed)))
    return runs


def step_d(state, work, models, clock, opts) -> None:
    d = state.data.setdefault("d", {"runs": {}})
    published = {
        f"{m}_seed{s}": json.loads((REPO / "reports" / "study" / "metrics" / f"{m}_seed{s}.json").read_text())
        for m, s in published_runs()
    }
    wanted = opts.d_runs or list(published)
    todo = [
        key
        for key in wanted
        if d["runs"].get(key, {}).get("status", "") != "done"
        and "failed" not in d["runs"].get(key, {}).get("status", "")
    ]
    if not todo:
        return
    if clock.left() - opts.reserve < 30:
        log.info("(d): too little time left for %d runs", len(todo))
        return

    def estimate(key):  # seconds: the published epoch count at (a)'s rate, else a guess
        model = key.rsplit("_seed", 1)[0]
        rate = ((state["a"]["entries"].get(model) or {}).get("job") or {}).get("images_per_s_median_later")
        batch = models[model]["batch_size"]
        rate = rate or (30000 if batch >= 512 else 10000)
        epochs = (published.get(key) or {}).get("epochs_run") or models[model]["epochs"]
        return 20 + epochs * 45000 / rate

    first = f"{opts.b_model}_seed{opts.b_seed}"  # the (b) job once more, among others: same numbers?
    todo.sort(key=lambda key: (key != first, estimate(key)))
    data, manifest = work / "data" / "cifar10.npz", work / "data" / "cifar10.json"
    queue = [
        Run(
            work,
            f"d_{key}",
            key.rsplit("_seed", 1)[0],
            int(key.rsplit("_seed", 1)[1]),
            data,
            manifest,
            work / "specs" / f"{key.rsplit('_seed', 1)[0]}.json",
            models[key.rsplit("_seed", 1)[0]]["tta"],
            opts.threads,
            opts.stop_after,
        )
        for key in todo
    ]
    deadline = clock.deadline - opts.reserve
    running, t0 = [], now()
    d["jobs_at_once"] = opts.d_jobs
    this_call = {"call": state["calls"][-1]["index"], "wall_s": 0.0, "started": len(queue)}
    d.setdefault("calls", []).append(this_call)
    d["order"] = todo
    log.info("(d): %d runs, %d at once, %.0f s: %s", len(todo), opts.d_jobs, deadline - t0, ", ".join(todo))
    last_save = now()
    while (queue or running) and now() < deadline:
        while queue and len(running) < opts.d_jobs and deadline - now() > 20:
            run = queue.pop(0)
            run.start_train()
            running.append(run)
        for run in list(running):
            if run.step(can_start_evaluate=deadline - now() > 10):
                running.remove(run)
                key = f"{run.model}_seed{run.seed}"
                d["runs"][key] = finish_d(run.record, published.get(key), state)
                log.info(
                    "(d) %s: %s, train %.0f s, test accuracy %s",
                    key,
                    run.record["status"],
                    run.record.get("train_wall_s") or 0,
                    (run.record.get("metrics") or {}).get("test_accuracy"),
                )
                state.save()
        if not running and queue and deadline - now() <= 20:
            break
        if now() - last_save > 15:
            this_call["wall_s"] = round(now() - t0, 1)
            d["wall_s"] = round(sum(c["wall_s"] for c in d["calls"]), 1)
            state.save()
            last_save = now()
        time.sleep(0.3)
    for run in running:
        run.stop()
        key = f"{run.model}_seed{run.seed}"
        d["runs"][key] = finish_d(run.record, published.get(key), state)
    for run in queue:
        d["runs"].setdefault(
            f"{run.model}_seed{run.seed}", {"model": run.model, "seed": run.seed, "status": "not started (time)"}
        )
    this_call["wall_s"] = round(now() - t0, 1)
    d["wall_s"] = round(sum(c["wall_s"] for c in d["calls"]), 1)
    d["done"] = sum(1 for r in d["runs"].values() if r.get("status") == "done")
    b = state.data.get("b") or {}
    if first in d["runs"] and d["runs"][first].get("status") == "done" and b.get("status") == "done":
        try:
            d["same_as_b"] = {"run": first, **compare(Path(b["folder"]), work / "runs" / f"d_{first}")}
        except Exception as exc:  # noqa: BLE001
            d["same_as_b"] = {"error": str(exc)}
    state.save()


def finish_d(record: dict, published: dict | None, state) -> dict:
    record = dict(record)
    if published:
        record["published"] = {
            "test_accuracy": published["test"]["accuracy"],
            "epochs_run": published["epochs_run"],
            "train_seconds": published["train_seconds"],
            "train_images_per_s": published["train_images_per_s"],
        }
    return record


# ---- versions ------------------------------------------------------------------------------------------------

VERSIONS = r"""
import json, os, platform, sys, importlib.metadata as md
out = {"python": platform.python_version(), "executable": sys.executable}
for p in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda13-pjrt", "keras", "numpy", "pandas", "scikit-learn", "scipy", "h5py",
          "optree", "ml-dtypes", "namex", "rich", "absl-py", "jsonschema", "PyYAML"):
    try:
        out[p] = md.version(p)
    except Exception:
        out[p] = None
import jax
out["jax_devices"] = [f"{d.platform}:{d.device_kind}" for d in jax.devices()]
out["device_kind"] = jax.devices()[0].device_kind
os.environ["KERAS_BACKEND"] = "jax"
import keras
out["keras_backend"] = keras.backend.backend()
out["keras_from"] = os.path.dirname(keras.__file__)
print(json.dumps(out))
"""


def versions(work: Path) -> dict:
    try:
        proc = subprocess.run(
            [sys.executable, "-c", VERSIONS],
            capture_output=True,
            text=True,
            timeout=90,
            env=child_env(work, keras_jax=True),
        )
        result = (
            json.loads(proc.stdout.strip().splitlines()[-1]) if proc.returncode == 0 else {"error": proc.stderr[-2000:]}
        )
    except Exception as exc:  # noqa: BLE001
        result = {"error": f"{type(exc).__name__}: {exc}"}
    if shutil.which("nvidia-smi"):
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=20,
        )
        result["nvidia_smi"] = smi.stdout.strip()
    result["cpus"] = os.cpu_count()
    return result


# ---- the call ------------------------------------------------------------------------------------------------


def cmd_call(opts) -> int:
    work, out = Path(opts.work), Path(opts.out) if opts.out else None
    work.mkdir(parents=True, exist_ok=True)
    setup_logging(work)
    if opts.tiny:
        for key, value in TINY.items():
            if getattr(opts, key) is None:
                setattr(opts, key, value)
    for key, value in DEFAULTS.items():
        if getattr(opts, key) is None:
            setattr(opts, key, value)
    opts.stop_after = opts.stop_after or None  # 0: every epoch (tests)
    clock = Clock(opts.budget)
    state = State(work, out)
    state["calls"].append(
        {
            "index": opts.index,
            "count": opts.count,
            "budget_s": opts.budget,
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "tiny": bool(opts.tiny),
            "argv": sys.argv[1:],
        }
    )
    state.save()
    sampler = GpuSampler(work / "logs" / "gpu.csv")
    sampler.start()
    try:
        if not state.data.get("versions"):
            state["versions"] = versions(work)
            log.info("versions: %s", json.dumps(state["versions"]))
            state.save()
        archive = None
        if opts.archive:
            archive = Path(opts.archive)
            got, want = sha256_file(archive), expected_sha256()
            state["archive"] = {
                "path": str(archive),
                "sha256": got,
                "expected": want,
                "ok": want is None or got == want,
            }
            if want is not None and got != want:
                raise SystemExit(f"{archive}: sha256 {got}, expected {want}")
        else:
            if opts.chunk and Path(opts.chunk, "manifest.json").is_file():
                take_chunk(state, work, Path(opts.chunk))
                state.save()
            archive = assemble(state, work)
        models = write_specs(work, Path(opts.config))
        ready = archive is not None or (state.data.get("data") or {}).get("npz_ok")
        steps = opts.steps if opts.steps != "auto" else ("data,a:60,b,c,d,a" if ready else "a")
        state["calls"][-1]["steps"] = steps
        for step in steps.split(","):
            name, _, cap = step.partition(":")
            if clock.left() < opts.reserve + 5:
                log.info("budget spent: %s and later steps not run", step)
                break
            with Window(state, sampler, name):
                if name == "data":
                    if (state.data.get("data") or {}).get("npz_ok"):
                        continue
                    if archive is None:
                        log.info("data: the archive is not complete here: (b), (c), (d) need it")
                        break
                    step_data(state, work, archive, opts)
                elif name == "a":
                    npz = speed_data(state, work, opts)
                    if npz is not None:
                        step_a(state, work, npz, clock, float(cap) if cap else None, opts, sampler)
                elif name in ("b", "c", "c2", "d"):
                    if not (state.data.get("data") or {}).get("npz_ok"):
                        log.info("%s: no full data here", name)
                        continue
                    {"b": step_b, "c": step_c, "c2": step_c2, "d": step_d}[name](state, work, models, clock, opts)
                else:
                    raise SystemExit(f"unknown step {name}")
    finally:
        sampler.stop.set()
        state["calls"][-1]["elapsed_s"] = round(now() - clock.start, 1)
        state["tensorflow"] = tensorflow_check(work)
        state.save()
    return 0


def tensorflow_check(work: Path) -> dict:
    path = work / "logs" / "tf_imports.log"
    lines = path.read_text().splitlines() if path.is_file() else []
    attempts = [line.split("\t") for line in lines if line.startswith("attempt")]
    exits = [line.split("\t") for line in lines if line.startswith("exit")]
    ours = [a[2] for a in attempts if str(SCRIPTS) in a[2]]
    loaded = [e[2] for e in exits if e[3] == "tensorflow_loaded=True"]
    here = "tensorflow" in sys.modules  # this process: data steps, specs
    starts = [line for line in lines if line.startswith("start")]
    return {
        "processes_started": len(starts),
        "processes_recorded": len(exits),
        "processes_with_tensorflow_loaded": loaded,
        "import_attempts": len(attempts),
        "attempts_from_workflow_code": sorted(set(ours)),
        "attempts_from_elsewhere": sorted({a[2] for a in attempts} - set(ours))[:10],
        "orchestrator_tensorflow_loaded": here,
        "hook_ran": bool(starts),
        "ok": bool(starts) and not loaded and not ours and not here,
    }


def cmd_pack(opts) -> int:
    """$OUT: results.json, summary.md, proof.log, logs.tar.gz (logs, histories, infos, metrics, specs)."""
    work, out = Path(opts.work), Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    state = State(work, out)
    if state["calls"]:
        state["calls"][-1]["rc"] = opts.rc
        state["tensorflow"] = tensorflow_check(work)
    state.save()
    if (work / "logs" / "proof.log").is_file():
        text = (work / "logs" / "proof.log").read_bytes()[-(8 << 20) :]
        (out / "proof.log").write_bytes(text)
    files = []
    for pattern in (
        "logs/*.log",
        "logs/*.csv",
        "a/rows.jsonl",
        "a/*/history.csv",
        "a/*/train_info.json",
        "runs/*/history.csv",
        "runs/*/train_info.json",
        "runs/*/metrics.json",
        "specs/*.json",
        "data/*.json",
        "summary.md",
        "results.json",
    ):
        files += [p for p in sorted(work.glob(pattern)) if p.is_file() and p.stat().st_size < (4 << 20)]
    limit, total = 15 << 20, 0
    with tarfile.open(out / "logs.tar.gz", "w:gz") as tar:
        for path in files:
            size = path.stat().st_size
            if total + size > 4 * limit:  # compressed ~4x at least: stay under 16 MiB
                continue
            total += size
            tar.add(path, arcname=str(path.relative_to(work)))
    if (out / "logs.tar.gz").stat().st_size > limit:
        (out / "logs.tar.gz").unlink()
    print((work / "summary.md").read_text()[-6000:])
    return 0


# ---- summary ---------------------------------------------------------------------------------------------------


def fmt(value, spec=",.0f", none="–"):
    if value is None:
        return none
    try:
        return format(value, spec)
    except (TypeError, ValueError):
        return str(value)


def published_note(model: str, seed: int) -> str:
    path = REPO / "reports" / "study" / "metrics" / f"{model}_seed{seed}.json"
    if not path.is_file():
        return "none"
    m = json.loads(path.read_text())
    return f"{m['test']['accuracy']:.4f} after {m['epochs_run']} epochs, {m['train_seconds']:.0f} s of training"


def summary(data: dict) -> str:
    lines = ["# GPU proof: the workflow's JAX path (tools/gpu_proof)", ""]
    v = data.get("versions") or {}
    if v:
        lines += [
            f"Device: {v.get('device_kind')} ({v.get('nvidia_smi', 'no nvidia-smi')}), {v.get('cpus')} CPUs. Python {v.get('python')}, "
            f"jax {v.get('jax')}, jaxlib {v.get('jaxlib')}, keras {v.get('keras')} (backend {v.get('keras_backend')}), numpy "
            f"{v.get('numpy')}, pandas {v.get('pandas')}, scikit-learn {v.get('scikit-learn')}."
            + (f" Versions: error {v['error'][-300:]}" if v.get("error") else ""),
            "",
        ]
    for call in data.get("calls", []):
        lines.append(
            f"- call {call['index']}/{call['count']}: {call.get('started')}, budget {call['budget_s']} s, ran "
            f"{fmt(call.get('elapsed_s'), '.0f')} s, steps {call.get('steps')}, exit {call.get('rc', '–')}"
            + (" (tiny: CPU emulation)" if call.get("tiny") else "")
        )
    arch = data.get("archive")
    if arch:
        lines += [
            "",
            f"Archive: sha256 {arch.get('sha256')} {'matches' if arch.get('ok') else 'DOES NOT MATCH'} the expected value.",
        ]
    dd = data.get("data")
    if dd:
        lines.append(
            f"Data: download.main {dd.get('download_s')} s (member md5s checked), preprocess.main {dd.get('preprocess_s')} s, "
            f"{dd.get('counts')}."
        )
    tf = data.get("tensorflow")
    if tf:
        verdict = (
            "not imported"
            if tf["ok"]
            else "NOT CHECKED (the hook did not run)"
            if not tf.get("hook_ran")
            else "IMPORTED OR ASKED FOR BY WORKFLOW CODE"
        )
        lines.append(
            f"TensorFlow: {verdict}: of "
            f"{tf.get('processes_started', '?')} Python processes started, {tf['processes_recorded']} exited normally (the others were "
            f"stopped at a deadline) and it was loaded in {len(tf['processes_with_tensorflow_loaded'])} of them; "
            f"import attempts {tf['import_attempts']} (from workflow code: {tf['attempts_from_workflow_code'] or 'none'})."
        )
    # (a)
    a = (data.get("a") or {}).get("entries") or {}
    peak = data.get("peak") or {}
    lines += ["", "## (a) Training images/s: the job (train.main) against the network alone (keras_speed)", ""]
    sd = data.get("speed_data")
    if sd:
        lines.append(
            f"train.main on {sd['counts']['train']} training images ({sd['from']}), the entry's spec as the spec rule writes it "
            "(backend jax), stopped after its first epochs; img/s: median of the epochs after the first (history.csv, "
            "validation excluded). Network alone: keras_speed.time_phases(without_augmentation=True) in the same process "
            "right after, same precision. Transfer entries start from random weights (no ImageNet files there)."
            + (
                f" Peak: {peak.get('flops_per_s', 0) / 1e12:.0f} TFLOP/s ({peak.get('dtype')}, {peak.get('size')}²)."
                if peak.get("flops_per_s")
                else ""
            )
        )
        lines.append("")
    if a:
        lines += [
            "| model | batch | job img/s | network alone img/s | job / network alone | job of peak | job epoch 1 s | net warm-up s | call |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for name in [n for n in A_ORDER if n in a] + sorted(set(a) - set(A_ORDER)):
            e = a[name]
            job, net = e.get("job") or {}, e.get("net") or {}
            ips = job.get("images_per_s_median_later")
            gflop = net.get("train_gflop_per_image")
            of_peak = ips * gflop * 1e9 / peak["flops_per_s"] if ips and gflop and peak.get("flops_per_s") else None
            err = job.get("error") or net.get("error")
            lines.append(
                f"| {name} | {job.get('batch_size', '')} | {fmt(ips)} | {fmt(net.get('images_per_s'))} | {fmt(e.get('ratio'), '.3f')} | "
                f"{fmt(of_peak, '.1%')} | {fmt(job.get('first_epoch_s'), '.1f')} | {fmt(net.get('warm_up_s'), '.1f')} | "
                f"{'/'.join(dict.fromkeys(str(x['call']) for x in (job, net) if x.get('call')))}{' ERROR: ' + err[:120] if err else ''} |"
            )
        missing = [n for n in A_ORDER if n not in a]
        if missing:
            lines += ["", f"Not measured (time): {', '.join(missing)}."]
    # (b)
    b = data.get("b")
    if b:
        h, m = b.get("history") or {}, b.get("metrics") or {}
        resumed = (
            f" Resumed after epoch {h['resumed_from_epoch']} (stopped at an earlier call's deadline): the epochs, wall and "
            "compile figures are the resumed job's."
            if h.get("resumed_from_epoch")
            else ""
        )
        lines += [
            "",
            f"## (b) {b['model']} seed {b['seed']}, full data, through train.py and evaluate.py",
            "",
            f"Status: {b['status']}. Train job wall {fmt(b.get('train_wall_s'), '.1f')} s; {h.get('epochs')} epochs: the first "
            f"{fmt(h.get('first_epoch_s'), '.1f')} s (compilation ≈ {fmt(h.get('compile_s_estimate'), '.1f')} s more than a later "
            f"epoch), the other {fmt((h.get('epochs') or 1) - 1, 'd')} {fmt(h.get('later_epochs_s'), '.1f')} s together "
            f"(median {fmt(h.get('later_epoch_s_median'), '.2f')} s, {fmt(h.get('images_per_s_median_later'))} img/s; "
            f"epoch times include validation). Evaluate job {fmt(b.get('evaluate_wall_s'), '.1f')} s. Test accuracy "
            f"{fmt(m.get('test_accuracy'), '.4f')} (without TTA {fmt(m.get('accuracy_without_tta'), '.4f')}; the published CPU "
            f"run: {published_note(b['model'], b['seed'])}). Precision {h.get('precision')}, XLA {h.get('jit_compile')}, device {h.get('device')}."
            + resumed,
        ]
        if h.get("epoch_time"):
            lines += ["", "| epoch | s | img/s | test accuracy |", "|---|---|---|---|"]
            accs = h.get("test_accuracy_per_epoch") or [None] * len(h["epoch_time"])
            for i, (t, r, acc) in enumerate(zip(h["epoch_time"], h["images_per_s"], accs, strict=False), start=1):
                lines.append(f"| {i} | {t:.2f} | {r:,.0f} | {fmt(acc, '.4f')} |")
        if b.get("progress"):
            lines.append(f"\nProgress before it ended: {json.dumps(b['progress'])[:1500]}")
    c = data.get("c")
    if c:
        comp = c.get("comparison") or {}
        lines += [
            "",
            "## (c) The same job again (same seed)",
            "",
            f"Status: {c['status']}. Identical: **{comp.get('identical')}** over {comp.get('epochs_compared')} epoch(s): history "
            f"{comp.get('history_identical')}, weights {comp.get('weights_identical', 'not compared')}, metrics "
            f"{comp.get('metrics_identical', 'not compared')}, test probabilities {comp.get('test_probs_identical', 'not compared')}.",
        ]
        if comp.get("first_difference"):
            lines.append(
                f"First difference: {json.dumps(comp['first_difference'])}; max differences {json.dumps(comp.get('max_abs_difference'))}; "
                f"weights max {comp.get('weights_max_abs_difference')}."
            )
        if c.get("history"):
            lines.append(
                f"Rerun: train job {fmt(c.get('train_wall_s'), '.1f')} s, first epoch {fmt(c['history'].get('first_epoch_s'), '.1f')} s."
            )
    c2 = data.get("c2")
    if c2:
        lines += [
            "",
            f"(c2) twice more for 2 epochs with XLA_FLAGS={c2['xla_flags']}: identical "
            f"{(c2.get('comparison') or {}).get('identical')}; runs {json.dumps([{k: r[k] for k in ('rc', 'wall_s')} for r in c2['runs']])}.",
        ]
    d = data.get("d")
    if d:
        runs = d.get("runs") or {}
        per_call = ", ".join(f"call {c['call']}: {c['wall_s']:.0f} s" for c in d.get("calls", []))
        lines += [
            "",
            f"## (d) The published study's runs, {d.get('jobs_at_once')} jobs at once on the GPU",
            "",
            f"{d.get('done', 0)} of {len(published_runs())} runs done in {fmt(d.get('wall_s'), '.0f')} s of wall time"
            f" ({per_call}); "
            "a run stopped at a call's deadline resumed from its checkpoint in the next (train.py's own resume).",
        ]
        if d.get("same_as_b"):
            lines.append(
                f"{d['same_as_b'].get('run')} here (sharing the GPU) against (b) (alone): identical {d['same_as_b'].get('identical')} "
                f"(history {d['same_as_b'].get('history_identical')}, weights {d['same_as_b'].get('weights_identical')})."
            )
        lines += [
            "",
            "| run | status | epochs (published) | train s | evaluate s | img/s (median, shared GPU) | test accuracy (published) | published CPU train s |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for key in d.get("order", []) + sorted(set(runs) - set(d.get("order", []))):
            r = runs.get(key)
            if not r:
                continue
            h, m, p = r.get("history") or {}, r.get("metrics") or {}, r.get("published") or {}
            epochs = h.get("epochs", (r.get("progress") or {}).get("epochs_done"))
            status = r["status"] + (" (resumed)" if r.get("resumed") else "")
            lines.append(
                f"| {key} | {status} | {fmt(epochs, 'd')} ({fmt(p.get('epochs_run'), 'd')}) | {fmt(r.get('train_wall_s'), '.0f')} | "
                f"{fmt(r.get('evaluate_wall_s'), '.0f')} | {fmt(h.get('images_per_s_median_later'))} | "
                f"{fmt(m.get('test_accuracy'), '.4f')} ({fmt(p.get('test_accuracy'), '.4f')}) | {fmt(p.get('train_seconds'))} |"
            )
    windows = data.get("windows") or {}
    if windows:
        lines += [
            "",
            "## Steps: seconds and GPU use (nvidia-smi, 1 s samples)",
            "",
            "| step | call | s | GPU util mean / max % | GPU memory max MiB |",
            "|---|---|---|---|---|",
        ]
        for name in sorted(
            windows,
            key=lambda n: ["data", "a", "b", "c", "c2", "d"].index(n) if n in ("data", "a", "b", "c", "c2", "d") else 9,
        ):
            items = windows[name]
            for w in sorted(items, key=lambda w: w["call"]):
                if w["seconds"] < 0.5:  # skipped: nothing to do
                    continue
                g = w.get("gpu") or {}
                lines.append(
                    f"| {name} | {w['call']} | {w['seconds']} | {fmt(g.get('util_mean'), '.0f')} / {fmt(g.get('util_max'), '.0f')} | "
                    f"{fmt(g.get('mem_max_mib'), '.0f')} |"
                )
    return "\n".join(lines) + "\n"


# ---- command line -----------------------------------------------------------------------------------------------

DEFAULTS = {
    "a_train": 20000,
    "a_val": 1000,
    "a_test": 1000,
    "a_epochs": 3,
    "a_images": 20480,
    "a_rounds": 3,
    "peak_size": 8192,
    "stop_after": None,
    "d_jobs": 6,
}
TINY = {
    "subset_train": 400,
    "subset_val": 100,
    "subset_test": 200,
    "a_train": 300,
    "a_val": 100,
    "a_test": 100,
    "a_epochs": 2,
    "a_images": 256,
    "a_rounds": 1,
    "peak_size": 0,
    "stop_after": 1,
    "d_jobs": 2,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/proof", help="state kept between calls (outside the work tree)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="where the results go ($OUT)")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("call", help="one device call")
    c.add_argument("--index", type=int, default=1)
    c.add_argument("--count", type=int, default=1)
    c.add_argument("--chunk", help="a carried chunk folder (.gpu_data/c<i>)")
    c.add_argument("--archive", help="the whole archive (local runs): no chunks")
    c.add_argument("--budget", type=float, required=True, help="seconds for this call's steps")
    c.add_argument(
        "--steps", default="auto", help="comma-separated: data, a[:cap_s], b, c, c2, d (auto: by the data there)"
    )
    c.add_argument("--reserve", type=float, default=6, help="seconds kept free at the end")
    c.add_argument("--config", default=str(REPO / "config.yaml"))
    c.add_argument("--threads", type=int, default=8, help="train jobs' --threads (the train rule's threads: 8)")
    c.add_argument("--tiny", action="store_true", help="tiny subsets, one epoch per job (CPU emulation)")
    for name in ("subset_train", "subset_val", "subset_test"):
        c.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=None, help="preprocess subsets of the full data (tests)"
        )
    for name in DEFAULTS:
        c.add_argument(f"--{name.replace('_', '-')}", type=int, default=None, help=f"default {DEFAULTS[name]}")
    c.add_argument(
        "--a-models", nargs="*", default=None, help=f"(a)'s entries, in order (default: {' '.join(A_ORDER)})"
    )
    c.add_argument("--b-model", default="model_17")
    c.add_argument("--b-seed", type=int, default=0)
    c.add_argument(
        "--c2-cap",
        type=float,
        default=0,
        help="seconds at most for (c2), if (c) differs (default 0: never; XLA's deterministic mode refuses "
        "the max-pool gradient, cnnstudy/runtime.py)",
    )
    c.add_argument(
        "--d-runs", nargs="*", default=None, help="(d)'s runs, e.g. model_17_seed0 (default: reports/study/metrics)"
    )
    w = sub.add_parser("worker-a", help="(a)'s worker process (internal)")
    for name in ("data", "specs", "folder", "rows"):
        w.add_argument(f"--{name}", required=True)
    w.add_argument("--deadline", type=float, required=True)
    for name in ("threads", "epochs", "images", "rounds", "peak-size"):
        w.add_argument(f"--{name}", type=int, required=True)
    w.add_argument("--entries", nargs="+", required=True)
    k = sub.add_parser("pack", help="write $OUT from the state")
    k.add_argument("--rc", type=int, default=None)
    opts = p.parse_args(argv)
    if opts.command == "call":
        return cmd_call(opts)
    if opts.command == "worker-a":
        return worker_a(opts)
    if not opts.out:
        p.error("pack needs --out or $OUT")
    return cmd_pack(opts)


if __name__ == "__main__":
    sys.exit(main())
