"""Training and evaluation throughput on this machine, written to reports/benchmark.md.

For each chosen model, on the same images:

- workflow: the training job's own path (train.py): tf.data from the npz arrays (shuffle,
  batch, prefetch), augmentation as Keras layers inside the model, the precision policy and
  XLA setting the job would pick;
- ceiling: the same model fed the same images as ready-made batches cached in memory, in order
  (no shuffling or gathering): the compute-bound limit; pipeline/ceiling near 1 means the
  input pipeline costs nothing;
- baseline: the study's way: float32, ``model.fit`` on numpy arrays with the same
  augmentation done as Keras 2's ImageDataGenerator did it (per-image scipy transforms);
- evaluation: ``predict`` images/s on the test images, workflow path and baseline.

Then the thread budget (section "concurrency"): 1, 2 and 4 concurrent training jobs, each given the
threads ``snakemake --cores 4`` would give it (4, 2, 1), capped by the job at the CPUs it may use.
And (section "backends") the training job's path on Keras' TensorFlow and JAX backends side by
side: one worker process per backend, taking turns epoch by epoch.

    python workflow_scripts/benchmark.py --data results/data/cifar10.npz --out reports/benchmark.md \\
        --specs results/specs/model_10.json results/specs/model_17.json --sections paths concurrency backends
    snakemake benchmark     # the same, as a workflow target (model_10, model_17, model_18; every section, but backends
                            # where tensorflow_build is gpu: no JAX beside it)
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
import typing
from pathlib import Path

import numpy as np

from cnnstudy import cli, runtime
from cnnstudy.errors import JobError
from cnnstudy.files import atomic_path

log = logging.getLogger("cnnstudy.benchmark")
HERE = Path(__file__).resolve().parent


def _load(specs: list[str]) -> dict:
    """Model entries from spec JSON files (results/specs/<model>.json, written by the spec rule)."""
    from cnnstudy.files import read_json

    entries = {}
    for path in specs:
        if not Path(path).is_file():
            raise FileNotFoundError(f"model spec not found: {path}: run `snakemake {path}` first")
        entry = read_json(path)
        entries[entry["name"]] = entry
    return entries


def _epoch_rate(model, n_images: int, **fit_args) -> float:
    """Images/s of one training epoch."""
    start = time.perf_counter()
    model.fit(epochs=1, verbose=0, **fit_args)
    return n_images / (time.perf_counter() - start)


def _predict_rate(model, n_images: int, **predict_args) -> float:
    start = time.perf_counter()
    model.predict(verbose=0, **predict_args)
    return n_images / (time.perf_counter() - start)


def _median_rate(measure, rounds: int) -> float:
    """Median of ``rounds`` measurements after one untimed warm-up (tracing, caches, pools)."""
    measure()
    return float(np.median([measure() for _ in range(rounds)]))


class StudyAugmentation:
    """The study's augmentation as its Keras 2 code did it (ImageDataGenerator): per image, on
    the CPU, in Python, a random affine transform applied with scipy.ndimage, nearest-pixel fill.

    The same transforms, written with public APIs (scipy, numpy, keras.utils.PyDataset), so the
    baseline no longer needs Keras' private legacy module.
    """

    def __init__(self, spec: dict):
        self.rotation_range = self.width_shift_range = self.height_shift_range = 0.0
        self.horizontal_flip = False
        for item in spec["augmentation"]:
            ((name, kwargs),) = item.items()
            if name == "RandomFlip":
                self.horizontal_flip = "horizontal" in kwargs.get("mode", "horizontal")
            elif name == "RandomTranslation":
                self.height_shift_range, self.width_shift_range = kwargs["height_factor"], kwargs["width_factor"]
            elif name == "RandomRotation":
                self.rotation_range = kwargs["factor"] * 360  # degrees, as ImageDataGenerator takes them

    def __bool__(self) -> bool:
        return bool(self.rotation_range or self.width_shift_range or self.height_shift_range or self.horizontal_flip)

    def transform(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One image (H, W, C): rotation about the centre and shift, then an optional mirror."""
        from scipy import ndimage

        height, width = image.shape[:2]
        theta = np.deg2rad(rng.uniform(-self.rotation_range, self.rotation_range))
        shift = np.array(
            [
                rng.uniform(-self.height_shift_range, self.height_shift_range) * height,
                rng.uniform(-self.width_shift_range, self.width_shift_range) * width,
            ]
        )
        rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
        centre = np.array([height, width]) / 2 - 0.5
        offset = centre - rotation @ centre + shift  # output pixel p reads input pixel rotation @ p + offset
        out = np.stack(
            [
                ndimage.affine_transform(image[..., c], rotation, offset, order=1, mode="nearest")
                for c in range(image.shape[-1])
            ],
            axis=-1,
        )
        return out[:, ::-1] if self.horizontal_flip and rng.random() < 0.5 else out

    def flow(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0):
        """Shuffled, augmented batches for model.fit, one epoch per pass."""
        import keras

        augment = self

        class Batches(keras.utils.PyDataset):
            def __init__(self):
                super().__init__()
                self.rng = np.random.default_rng(seed)
                self.order = self.rng.permutation(len(x))

            def __len__(self):
                return -(-len(x) // batch_size)

            def __getitem__(self, index):
                chosen = self.order[index * batch_size : (index + 1) * batch_size]
                return np.stack([augment.transform(x[i], self.rng) for i in chosen]), y[chosen]

            def on_epoch_end(self):
                self.order = self.rng.permutation(len(x))

        return Batches()


PATHS = ("workflow", "ceiling", "baseline")


def _path_setup(path: str, spec: dict, x, y, x_test, steps: int, precision: str, device) -> tuple:
    """One measured path's (model, fit arguments, predict arguments or None, policy, XLA)."""
    import keras

    from cnnstudy import datasets, models

    batch = spec["batch_size"]
    policy = "float32" if path == "baseline" else runtime.resolve_precision(precision, device)
    jit = False if path == "baseline" else runtime.resolve_jit(spec.get("jit_compile", "auto"), device, policy)
    keras.mixed_precision.set_global_policy(policy)  # a model keeps the policy it was built under
    runtime.seed_everything(0)
    entry = {**spec, "augmentation": []} if path == "baseline" else spec  # the generator augments
    model = models.compile_model(models.build_model(entry, train_images=x), entry, steps, jit)
    if path == "workflow":
        fit = {"x": datasets.train_dataset(x, y, batch, seed=0), "shuffle": False}
        predict = {"x": datasets.eval_dataset(x_test, None, 500)}
    elif path == "ceiling":
        # Distinct batches, not one batch repeated: a model fed a single batch fits it within an
        # epoch (loss ~0.001) and then ran 30 % slower than the real path (model_10, measured).
        fit = {"x": datasets.eval_dataset(x, y, batch).cache()}  # in order; filled by the warm-up
        predict = None
    else:
        augmentation = StudyAugmentation(spec)
        fit = {"x": augmentation.flow(x, y, batch, seed=0)} if augmentation else {"x": x, "y": y, "batch_size": batch}
        predict = {"x": x_test, "batch_size": 500}
    return model, fit, predict, policy, jit


def measure_paths(
    data: str, spec_path: str, paths, images: int, rounds: int, threads: int, precision: str, peak_seconds: float
) -> dict:
    """Training (and evaluation) images/s of ``paths``, all in this one process.

    workflow: the training job's tf.data pipeline, precision and XLA setting; ceiling: the same
    model fed the same images as cached, ready-made batches; baseline: float32, numpy arrays and Keras 2's
    ImageDataGenerator for the entry's augmentation. The paths take turns, epoch by epoch, so
    that whatever speed this process runs at, every path sees it: the ratios compare like
    with like. Then the bfloat16 and float32 matmul peaks, each measured for ``peak_seconds``
    (0: none, for measurements that report only img/s).
    """
    intra, _ = runtime.configure_threads(threads)
    with np.load(data) as arrays:
        x, y, x_test = arrays["x_train"][:images], arrays["y_train"][:images], arrays["x_test"]
    (spec,) = _load([spec_path]).values()
    device = runtime.setup_device()
    batch = spec["batch_size"]
    steps = len(x) // batch
    x, y = x[: steps * batch], y[: steps * batch]
    setups, settings = {}, {}  # path -> (model, fit args, predict args); path -> (policy, XLA)
    for path in paths:
        model, fit, predict, policy, jit = _path_setup(path, spec, x, y, x_test, steps, precision, device)
        setups[path], settings[path] = (model, fit, predict), (policy, jit)
        _epoch_rate(model, len(x), **fit)  # untimed warm-up: tracing, caches, thread pools
        if predict:
            _predict_rate(model, len(x_test), **predict)
    train_rates = {path: [] for path in paths}
    eval_rates = {path: [] for path in paths if setups[path][2]}
    for _ in range(rounds):
        for path, (model, fit, predict) in setups.items():
            train_rates[path].append(_epoch_rate(model, len(x), **fit))
            if predict:
                eval_rates[path].append(_predict_rate(model, len(x_test), **predict))
    from cnnstudy import flops

    per_image = flops.TRAIN_FACTOR * flops.forward_flops(setups[paths[0]][0])
    peaks = _peaks(peak_seconds) if peak_seconds > 0 else None  # same process, right after
    return {
        path: {
            "path": path,
            "precision": settings[path][0],
            "XLA": settings[path][1],
            "intra_op": intra,
            "batch": batch,
            "train img/s": float(np.median(train_rates[path])),
            "train FLOPs/img": per_image,
            "peak FLOP/s": peaks,
            **({"eval img/s": float(np.median(eval_rates[path]))} if path in eval_rates else {}),
        }
        for path in paths
    }


def _peaks(seconds: float) -> dict:
    from cnnstudy import flops

    return {dtype: flops.matmul_peak(dtype, seconds=seconds) for dtype in ("bfloat16", "float32")}


def _measure_args(
    data: str, spec_path: str, images: int, rounds: int, threads: int, precision: str, peak_seconds: float
) -> list[str]:
    """The command-line arguments a measuring process of this script (see _spawn, Worker) takes."""
    return [
        "--data",
        data,
        "--specs",
        spec_path,
        "--images",
        str(images),
        "--rounds",
        str(rounds),
        "--threads",
        str(threads),
        "--precision",
        precision,
        "--peak-seconds",
        str(peak_seconds),
    ]


def _spawn(
    data: str,
    spec_path: str,
    paths: str,
    images: int,
    rounds: int,
    threads: int,
    precision: str,
    peak_seconds: float,
    jobs: int = 1,
):
    """Run ``jobs`` copies of one measurement (``paths``: comma-separated; then the matmul peaks,
    measured for ``peak_seconds``, none: 0), each in a fresh process, at once."""
    cmd = [
        sys.executable,
        str(HERE / "benchmark.py"),
        "--measure",
        paths,
        *_measure_args(data, spec_path, images, rounds, threads, precision, peak_seconds),
    ]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(jobs)]
    results = []
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode:
            raise JobError(f"benchmark measurement failed ({proc.returncode}): {' '.join(cmd)}\n{err[-2000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def measure_model(
    data: str,
    spec_path: str,
    images: int,
    rounds: int,
    threads: int,
    precision: str,
    processes: int,
    peak_seconds: float,
) -> dict:
    """The three paths of one model, together in each of ``processes`` fresh processes; the fastest is kept.

    On the 2-vCPU machine this was developed on, a TensorFlow process can land at random in a
    fast or a slow mode (a quarter of the CPU idle) for its whole life. All three paths of a
    row come from one process, so its ratios hold whichever mode that was; the process with
    the fastest workflow path is reported.
    """
    (name,) = _load([spec_path])
    runs = [
        _spawn(data, spec_path, ",".join(PATHS), images, rounds, threads, precision, peak_seconds)[0]
        for _ in range(processes)
    ]
    got = max(runs, key=lambda run: run["workflow"]["train img/s"])
    row = {
        "model": name,
        "precision": got["workflow"]["precision"],
        "XLA": got["workflow"]["XLA"],
        "batch size": got["workflow"]["batch"],
        **{f"{path} img/s": got[path]["train img/s"] for path in PATHS},
        "eval img/s": got["workflow"]["eval img/s"],
        "baseline eval img/s": got["baseline"]["eval img/s"],
        "workflow img/s, each process": [round(run["workflow"]["train img/s"]) for run in runs],
    }
    row["pipeline/ceiling"] = row["workflow img/s"] / row["ceiling img/s"]
    row["workflow/baseline"] = row["workflow img/s"] / row["baseline img/s"]
    peaks, per_image = got["workflow"]["peak FLOP/s"], got["workflow"]["train FLOPs/img"]
    policy = "bfloat16" if "bfloat16" in got["workflow"]["precision"] else "float32"
    row["train GFLOP/img"] = per_image / 1e9
    row["workflow GFLOP/s"] = per_image * row["workflow img/s"] / 1e9
    row[f"peak GFLOP/s ({policy})"] = peaks[policy] / 1e9
    row["workflow/peak"] = per_image * row["workflow img/s"] / peaks[policy]
    row["baseline/peak (float32)"] = per_image * row["baseline img/s"] / peaks["float32"]
    row["peak bf16/f32"] = peaks["bfloat16"] / peaks["float32"]
    log.info("%s", json.dumps(row, default=str))
    return row


def concurrency(
    data: str, spec_path: str, images: int, rounds: int, cores: int, precision: str, counts=(1, 2, 4)
) -> list[dict]:
    rows = []
    for jobs in counts:
        threads = max(1, cores // jobs)  # what `snakemake --cores {cores}` gives each of `jobs` jobs
        start = time.perf_counter()
        results = [
            r["workflow"]  # img/s only: no peaks measured (0 s)
            for r in _spawn(data, spec_path, "workflow", images, rounds, threads, precision, 0, jobs=jobs)
        ]
        per_job = [r["train img/s"] for r in results]
        rows.append(
            {
                "concurrent jobs": jobs,
                "threads per job": threads,
                "TF intra-op threads": results[0]["intra_op"],
                "img/s per job": float(np.mean(per_job)),
                "img/s all jobs": float(np.sum(per_job)),
                "wall s (incl. start-up)": time.perf_counter() - start,
            }
        )
        log.info("%s", rows[-1])
    return rows


ANSWER = "@@ "  # a worker's answers start with this; Keras or a backend may print other lines


def backend_worker(
    data: str, spec_path: str, images: int, rounds: int, threads: int, precision: str, peak_seconds: float
) -> None:
    """``--worker``: the training job's path on the backend KERAS_BACKEND names, in a process of its
    own (Keras fixes its backend per process), driven over stdin. One ``fit`` of 1 + ``rounds`` epochs
    (one fit, as a job runs one per phase: on JAX a second fit of a model with a weight average
    fails, docs/speed.md): after the untimed first epoch it answers its settings, then waits for
    ``epoch`` before each timed epoch and answers its img/s; then ``peak`` measures the bfloat16 and
    float32 matmul peaks, each for ``peak_seconds``. Each answer is one JSON line."""
    import os

    runtime.select_backend(os.environ.get("KERAS_BACKEND", "tensorflow"))
    (spec,) = _load([spec_path]).values()
    with np.load(data) as arrays:
        x, y = arrays["x_train"][:images], arrays["y_train"][:images]
    settings = runtime.prepare(threads, precision, spec.get("jit_compile", "auto"), seed=0)
    import keras

    from cnnstudy import datasets, flops, models

    batch = spec["batch_size"]
    steps = len(x) // batch
    x, y = x[: steps * batch], y[: steps * batch]
    model = models.compile_model(models.build_model(spec, train_images=x), spec, steps, settings["jit_compile"])

    def answer(**values):
        print(ANSWER + json.dumps(values), flush=True)

    class Turns(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            if epoch > 0 and sys.stdin.readline().strip() != "epoch":
                raise JobError("the benchmark's coordinator stopped asking for epochs")
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            float(logs["loss"])  # waits for the epoch's last step on an asynchronous backend
            seconds = time.perf_counter() - self.start
            if epoch == 0:  # the warm-up: tracing, compilation, thread pools
                answer(
                    backend=keras.backend.backend(),
                    precision=settings["precision"],
                    XLA=bool(self.model.jit_compile),
                    batch=batch,
                    threads=settings["threads"]["intra_op"],
                    images=len(x),
                    warm_up_s=seconds,
                    train_flops=flops.TRAIN_FACTOR * flops.forward_flops(self.model),
                )
            else:
                answer(rate=len(x) / seconds)

    batches = datasets.training_batches(x, y, batch, seed=0, epochs=1 + rounds)
    model.fit(batches, steps_per_epoch=steps, epochs=1 + rounds, callbacks=[Turns()], shuffle=False, verbose=0)
    if sys.stdin.readline().strip() == "peak":
        answer(**_peaks(peak_seconds))


class Worker:
    """A backend_worker process, asked one thing at a time."""

    def __init__(self, backend: str, args: list[str], log_path: Path):
        import os

        self.backend, self.log_path = backend, log_path
        self.proc = subprocess.Popen(
            [sys.executable, str(HERE / "benchmark.py"), "--worker", "true", *args],
            env={**os.environ, "KERAS_BACKEND": backend},
            text=True,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(log_path, "w"),
        )

    def ask(self, command: str | None = None) -> dict:
        if command:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(ANSWER):
                return json.loads(line[len(ANSWER) :])
        self.proc.wait()
        raise JobError(
            f"the {self.backend} worker ended ({self.proc.returncode}) without an answer: "
            f"{self.log_path.read_text()[-2000:]}"
        )

    def close(self) -> None:
        """End of input ends the worker; one that does not end within a minute is killed."""
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()


def compare_backends(
    data: str,
    spec_path: str,
    backends: list[str],
    images: int,
    rounds: int,
    threads: int,
    precision: str,
    peak_seconds: float,
    scratch: Path,
) -> list[dict]:
    """The training job's path of one entry on each backend, in one worker process per backend, started
    together; after each worker's untimed warm-up epoch they take turns, epoch by epoch, ``rounds``
    times (so a slow spell of this machine falls on every backend alike); then each measures its
    matmul peaks. One row per backend: median img/s and the fraction of the machine's bfloat16 peak
    (the higher of the backends' measured bfloat16 peaks)."""
    args = _measure_args(data, spec_path, images, rounds, threads, precision, peak_seconds)
    (name,) = _load([spec_path])
    workers = [Worker(backend, args, scratch / f"{name}-{backend}.log") for backend in backends]
    try:
        ready = [worker.ask() for worker in workers]
        rates = [[] for _ in workers]
        for _ in range(rounds):
            for worker, got in zip(workers, rates, strict=True):
                got.append(worker.ask("epoch")["rate"])
        peaks = [worker.ask("peak") for worker in workers]
    finally:
        for worker in workers:
            worker.close()
    machine_bf16 = max(peak["bfloat16"] for peak in peaks)
    rows = []
    for first, got, peak in zip(ready, rates, peaks, strict=True):
        rate = float(np.median(got))
        rows.append(
            {
                "model": name,
                "backend": first["backend"],
                "precision": first["precision"],
                "XLA": first["XLA"],
                "batch size": first["batch"],
                "threads": first["threads"],
                "train img/s": rate,
                "each epoch img/s": [round(r) for r in got],
                "warm-up s": first["warm_up_s"],
                "train GFLOP/s": first["train_flops"] * rate / 1e9,
                "of the bf16 peak": first["train_flops"] * rate / machine_bf16,
                "bf16 peak GFLOP/s": peak["bfloat16"] / 1e9,
                "f32 peak GFLOP/s": peak["float32"] / 1e9,
            }
        )
        log.info("%s", json.dumps(rows[-1]))
    return rows


Section = typing.Literal["paths", "concurrency", "backends"]
SECTIONS = typing.get_args(Section)


def main(
    data: str,
    out: str | None = None,
    specs: list[str] = (),
    images: int = 8192,
    rounds: int = 3,
    processes: int = 2,
    threads: int = 2,
    precision: runtime.Precision = "auto",
    concurrency_cores: int = 4,
    concurrency_jobs: list[int] = (1, 2, 4),
    measure: str | None = None,
    sections: list[Section] = ("paths", "concurrency"),
    backends: list[runtime.Backend] = runtime.BACKENDS,
    peak_seconds: float = 3.0,
    worker: bool = False,
) -> dict:
    if worker:  # one backend's worker process (see compare_backends)
        return backend_worker(data, specs[0], images, rounds, threads, precision, peak_seconds)
    if measure:  # one measurement, in its own process (see _spawn)
        result = measure_paths(data, specs[0], measure.split(","), images, rounds, threads, precision, peak_seconds)
        print(json.dumps(result), flush=True)
        return result
    if not out:
        raise JobError("--out is required")
    if not Path(data).is_file():
        raise FileNotFoundError(f"benchmark data not found: {data}: run the preprocess rule first")
    if not specs:
        raise JobError("no --specs given: name the models' spec files (results/specs/<model>.json)")
    unknown = sorted(set(sections) - set(SECTIONS))
    if unknown:
        raise JobError(f"unknown benchmark section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    results, text = {}, [_header(images, threads, rounds)]
    if "paths" in sections:
        results["models"] = [
            measure_model(data, path, images, rounds, threads, precision, processes, peak_seconds) for path in specs
        ]
        text += _paths_section(results["models"], data, processes, rounds)
    if "concurrency" in sections:
        results["concurrency"] = concurrency(
            data, specs[0], images, rounds, concurrency_cores, precision, concurrency_jobs
        )
        text += _concurrency_section(results["concurrency"], next(iter(_load(specs[:1]))), images, concurrency_cores)
    if "backends" in sections:
        import tempfile

        results["backends"] = []
        with tempfile.TemporaryDirectory() as scratch:
            for path in specs:
                results["backends"] += compare_backends(
                    data, path, backends, images, rounds, threads, precision, peak_seconds, Path(scratch)
                )
        text += _backends_section(results["backends"], images, rounds)
    with atomic_path(out) as tmp:
        Path(tmp).write_text("\n".join(text))
    log.info("wrote %s\n%s", out, "\n".join(text))
    return results


def _header(images: int, threads: int, rounds: int) -> str:
    device = runtime.setup_device()  # this (TensorFlow) process: what the machine is
    intra = min(threads, runtime.available_cpus())
    import tensorflow as tf

    return "\n".join(
        [
            "# Throughput benchmark",
            "",
            f"Generated by `workflow_scripts/benchmark.py` on {time.strftime('%Y-%m-%d %H:%M')}: {device['kind']} "
            f"{device['name']} ({runtime.available_cpus()} CPUs usable, TensorFlow {tf.__version__}, "
            f"{intra} intra-op threads), {images} training images. Absolute figures are this machine's on "
            "this day (a small VM's speed varies by up to 2x from day to day); compare ratios within one row "
            f"or one table, whose figures come from processes that took turns (medians of {rounds} epochs after "
            "an untimed warm-up epoch).",
            "",
        ]
    )


def _paths_section(rows: list[dict], data: str, processes: int, rounds: int) -> list[str]:
    import pandas as pd

    with np.load(data) as arrays:
        n_test = len(arrays["x_test"])
    table = pd.DataFrame(rows)[
        [
            "model",
            "precision",
            "XLA",
            "batch size",
            "workflow img/s",
            "ceiling img/s",
            "pipeline/ceiling",
            "baseline img/s",
            "workflow/baseline",
            "eval img/s",
            "baseline eval img/s",
            "workflow img/s, each process",
        ]
    ]
    peak_columns = [c for c in rows[0] if "FLOP" in c or "peak" in c]
    return [
        "## Training paths",
        "",
        f"Each model runs in {processes} fresh processes; in each, the three paths take turns for {rounds} "
        "epochs, so they share whatever speed that process got (on a small VM a TensorFlow process can land "
        "in a slow mode for its whole life); the process with the fastest workflow path is kept. Training "
        "images/s: *workflow* is the training job's own path (tf.data, in-model augmentation, "
        "the precision the job picks); *ceiling* feeds the same model the same images as ready-made batches "
        "cached in memory (no shuffling or gathering); *baseline* is the study's way (float32, `model.fit` on "
        "numpy with per-image scipy augmentation, as Keras 2's ImageDataGenerator did it). Goals: "
        f"pipeline/ceiling >= 0.95, workflow/baseline >= 2. Evaluation: `predict` on the {n_test} test images.",
        "",
        table.to_markdown(index=False, floatfmt=".2f"),
        "",
        "## Against the machine's peak",
        "",
        "Training FLOPs per image are counted from the model's layers (cnnstudy/flops.py): the multiply-adds of "
        "convolutions and dense layers, 2 FLOPs each, times 3 for a training step (forward, input gradient, "
        "weight gradient); elementwise work is not counted. The peak is the sustained rate of large square "
        "`keras.ops.matmul`s (2048x2048, bfloat16 and float32), measured in the same process right after the "
        "training rows. workflow/peak: the workflow path's training FLOP/s over the peak of its precision.",
        "",
        pd.DataFrame(rows)[["model", *peak_columns]].to_markdown(index=False, floatfmt=".3f"),
        "",
    ]


def _concurrency_section(rows: list[dict], model: str, images: int, cores: int) -> list[str]:
    import pandas as pd

    return [
        f"## Concurrent training jobs ({model}, workflow path, {images} images each)",
        "",
        f"Jobs given the threads `snakemake --cores {cores}` would give them, one process each, as in a real "
        "run; each job caps TensorFlow's intra-op threads at the CPUs it may use.",
        "",
        pd.DataFrame(rows).to_markdown(index=False, floatfmt=".1f"),
        "",
    ]


def _backends_section(rows: list[dict], images: int, rounds: int) -> list[str]:
    import pandas as pd

    return [
        f"## Backends side by side (training job's path, {images} images)",
        "",
        "Keras fixes its backend per process, so each backend runs in a worker process of its own, both "
        "started together; after an untimed warm-up epoch (tracing, XLA compilation) they take turns, one "
        f"epoch each, {rounds} times, and the median is shown. Each uses what the training job would: tf.data "
        "and the CPU's precision policy on TensorFlow, NumPy batches (`datasets.epoch_batches`) with XLA "
        "on JAX, same batches. *of the bf16 peak*: training FLOP/s over the higher of the two backends' "
        "measured bfloat16 matmul peaks, the machine's.",
        "",
        pd.DataFrame(rows).to_markdown(index=False, floatfmt=".3g"),
        "",
    ]


HELP = {
    "data": "preprocessed .npz",
    "out": "markdown file to write (e.g. reports/benchmark.md)",
    "specs": "model spec JSONs; the first also runs the concurrency test",
    "images": "training images per epoch measured",
    "rounds": "epochs measured per process (the median: robust to one slow epoch)",
    "processes": "fresh processes per path (best kept)",
    "sections": "what to measure: the three training paths (and the peak), concurrent jobs, backends side by side",
    "backends": "the Keras backends the backends section compares",
    "peak_seconds": "how long each matmul peak (bfloat16, float32) is measured, in each process that reports one",
    "measure": cli.HIDDEN,  # internal: comma-separated paths, one process (see _spawn)
    "worker": cli.HIDDEN,  # internal: one backend's worker (see compare_backends)
}

if __name__ == "__main__":
    sys.exit(cli.run(main, help=HELP))
