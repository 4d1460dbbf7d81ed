"""Where and how a job runs: Keras' backend (TensorFlow or JAX), threads, device, precision policy,
seeds. A JAX job imports no TensorFlow."""

from __future__ import annotations

import logging
import os
import platform
import typing

log = logging.getLogger("cnnstudy.runtime")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
Backend = typing.Literal["tensorflow", "jax"]
BACKENDS = typing.get_args(Backend)
# The `precision` setting (auto: resolve_precision's choice for the device).
Precision = typing.Literal["auto", "float32", "mixed_bfloat16", "mixed_float16"]


# Packages that TensorFlow and Keras import at start-up whenever they are installed, each behind an
# `except ImportError`: TF Lite imports jax, Keras' scikit-learn wrapper sklearn, its image gallery
# matplotlib. A train or evaluate job refuses the ones it never uses (cli.run(..., unused=...)), which saves
# seconds of every job's start-up: `import tensorflow, keras` took 6.5 s with them, 4.2 s with all
# three refused (median of 3 each, 2-core EPYC, 2026-12-04). Test processes calling main() refuse nothing.
STARTUP_EXTRAS = ("jax", "sklearn", "matplotlib")


def refuse_imports(names) -> None:
    """Make ``import name`` raise ImportError in this process, for modules not imported yet."""
    import sys

    for name in names:
        sys.modules.setdefault(name, None)


def select_backend(backend: str) -> str:
    """Keras fixes its backend when it is first imported: set KERAS_BACKEND before that. A process
    whose Keras already runs another backend cannot switch (a test calling main() twice). A job that
    refused jax (refuse_imports) gets it back when jax is its backend."""
    import sys

    from .errors import JobError

    if backend not in BACKENDS:
        raise JobError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
    if backend == "jax" and "jax" in sys.modules and sys.modules["jax"] is None:
        del sys.modules["jax"]
    if "keras" in sys.modules:
        current = sys.modules["keras"].backend.backend()
        if current != backend:
            raise JobError(
                f"Keras already runs on {current} in this process: a {backend} job needs a process of its own"
            )
        return backend
    os.environ["KERAS_BACKEND"] = backend
    return backend


def backend() -> str:
    """The backend Keras runs (or will run) in this process."""
    import sys

    return (
        sys.modules["keras"].backend.backend()
        if "keras" in sys.modules
        else os.environ.get("KERAS_BACKEND", "tensorflow")
    )


def available_cpus() -> int:
    """CPUs this process may run on (affinity, cgroup-pinned jobs), not the machine's total."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def allotted_threads(threads: int) -> int:
    """The job's Snakemake ``threads``, never more than the CPUs it may use."""
    return max(1, min(int(threads), available_cpus()))


def configure_threads(threads: int) -> tuple[int, int]:
    """Give TensorFlow the job's Snakemake `threads`, never more than the CPUs it may use.

    Asking for more threads than cores (``--cores 4`` on a 2-core machine) only adds
    contention, so intra-op threads are capped; one inter-op thread is enough for a CNN's
    sequential graph. Call before TensorFlow runs any op. On JAX, XLA's CPU flags say the same,
    before JAX starts (best effort: its client keeps a small pool of its own).
    """
    intra = allotted_threads(threads)
    inter = 1
    if backend() == "jax":
        import sys

        if "jax" not in sys.modules:
            flags = (
                f"--xla_cpu_multi_thread_eigen={'true' if intra > 1 else 'false'} intra_op_parallelism_threads={intra}"
            )
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
        return intra, inter
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(intra)
        tf.config.threading.set_inter_op_parallelism_threads(inter)
    except RuntimeError:  # TensorFlow already running in this process (tests calling main() twice)
        intra = tf.config.threading.get_intra_op_parallelism_threads() or available_cpus()
        inter = tf.config.threading.get_inter_op_parallelism_threads() or 1
        log.warning("TensorFlow already initialised: keeping intra=%d inter=%d threads", intra, inter)
    return intra, inter


def cpu_info() -> tuple[str, set[str]]:
    """CPU model name and feature flags (Linux /proc/cpuinfo; best effort elsewhere)."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and value.strip():
                    name = value.strip()
                elif key == "flags":
                    flags = set(value.split())
                if flags and name:
                    break
    except OSError:
        pass
    return name, flags


GPU_FIX = (
    "install TensorFlow's GPU build (`make run GPU=1`, i.e. pip install -r requirements-gpu.txt; "
    "with --sdm conda: --config tensorflow_build=gpu), or set require_gpu: false to train on the CPU"
)


def nvidia_gpus_present() -> bool:
    """Whether this machine has an NVIDIA GPU with its driver loaded, whatever TensorFlow sees."""
    import glob

    return bool(glob.glob("/proc/driver/nvidia/gpus/*"))


def setup_device(require_gpu: str = "auto", deterministic_ops: bool = True) -> dict:
    """Use the GPUs TensorFlow sees (it honours CUDA_VISIBLE_DEVICES), with memory growth.

    require_gpu: true fails unless TensorFlow sees a GPU; auto fails when the machine has an
    NVIDIA GPU that TensorFlow cannot see (CPU-only TensorFlow installed: training would run
    on the CPU, silently and far slower); false never fails. The error says how to fix it.
    On GPUs, deterministic_ops turns on TensorFlow's op determinism, so the same seed gives
    the same numbers there too (slower; CPU kernels used here are deterministic already).
    Returns a description for logs and provenance.
    """
    if backend() == "jax":
        return _setup_jax_device(require_gpu, deterministic_ops)
    import tensorflow as tf

    from .errors import JobError

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus and (require_gpu == "true" or (require_gpu == "auto" and nvidia_gpus_present())):
        why = "this machine has an NVIDIA GPU but" if require_gpu == "auto" else "require_gpu is true but"
        raise JobError(f"{why} TensorFlow sees no GPU (tensorflow {tf.__version__}, CPU-only build?): {GPU_FIX}")
    for gpu in gpus:
        tf.config.experimental.set_memory_growth(gpu, True)
    if gpus and deterministic_ops:
        tf.config.experimental.enable_op_determinism()
    info: dict = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}
    if gpus:
        details = [tf.config.experimental.get_device_details(gpu) for gpu in gpus]
        info.update(
            deterministic_ops=deterministic_ops,
            kind="GPU",
            name=details[0].get("device_name", gpus[0].name),
            count=len(gpus),
            compute_capability=list(details[0].get("compute_capability") or []),
        )
    else:
        name, _ = cpu_info()
        info.update(kind="CPU", name=name, count=available_cpus())
    return info


JAX_GPU_FIX = "install JAX's CUDA build (`make run BACKEND=jax GPU=1`: jax[cuda12]), or set require_gpu: false"


def _setup_jax_device(require_gpu: str, deterministic_ops: bool) -> dict:
    """setup_device for JAX: the devices JAX sees; the same require_gpu rules and errors."""
    import jax

    from .errors import JobError

    gpus = [d for d in jax.devices() if d.platform == "gpu"]
    if not gpus and (require_gpu == "true" or (require_gpu == "auto" and nvidia_gpus_present())):
        why = "this machine has an NVIDIA GPU but" if require_gpu == "auto" else "require_gpu is true but"
        raise JobError(f"{why} JAX sees no GPU (jax {jax.__version__}, CPU-only jaxlib?): {JAX_GPU_FIX}")
    info: dict = {
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "backend": "jax",
        "jax": jax.__version__,
    }
    if gpus:
        capability = str(getattr(gpus[0], "compute_capability", "") or "0")
        # XLA's deterministic mode (--xla_gpu_deterministic_ops) refuses to compile the max-pool
        # gradient (select-and-scatter, google/flax#4233), which most rungs need: not turned on, and
        # recorded as off, so the same seed may give other numbers on a GPU (docs/reproducibility.md).
        if deterministic_ops:
            log.warning(
                "deterministic_ops: not available on JAX GPUs (no deterministic max-pool gradient in XLA); "
                "same-seed runs may differ here"
            )
        info.update(
            kind="GPU",
            name=gpus[0].device_kind,
            count=len(gpus),
            deterministic_ops=False,
            compute_capability=[int(part) for part in capability.split(".")],
        )
    else:
        info.update(kind="CPU", name=cpu_info()[0], count=available_cpus())
    return info


def resolve_precision(requested: str, device: dict, cpu_flags: set[str] | None = None) -> str:
    """The Keras dtype policy for ``requested`` ('auto' or an explicit policy).

    auto, per backend and device:
    - TensorFlow on CPUs with bf16 instructions (AVX512-BF16, AMX): mixed_bfloat16 (measured:
      docs/speed.md, benchmark.md); other CPUs float32.
    - JAX on CPUs: float32. XLA's CPU convolutions ran no faster in bfloat16 (model_10, 2-core EPYC
      with AVX512-BF16: 72-73 img/s either way); its bfloat16 matmuls ran at a third of oneDNN's
      and below its own float32 ones (116-128 against 362-403 and 170-186 GFLOP/s: docs/speed.md).
    - GPUs, both backends: mixed_bfloat16 from compute capability 8 (Ampere) on, mixed_float16
      (with loss scaling) before. Not measured here (no GPU has run the jobs yet): NVIDIA's
      guidance, bfloat16 has float32's range, so no loss scaling, on the tensor cores of Ampere
      and later; Keras' mixed-precision guide names mixed_float16 for GPUs in general. An explicit
      ``precision`` overrides it where a GPU's bf16 kernels fall short (tensorflow#59050).
    """
    if requested != "auto":
        return requested
    if device.get("backend") == "jax" and device.get("kind") != "GPU":
        return "float32"
    if device.get("kind") == "GPU":
        major = (device.get("compute_capability") or [0])[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16"
    flags = cpu_info()[1] if cpu_flags is None else cpu_flags
    return "mixed_bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


def resolve_jit(requested: str, device: dict, policy: str) -> bool | str:
    """XLA for ``model.compile(jit_compile=...)``: 'on' True, 'off' False, 'auto' as measured.

    auto, per backend and device:
    - JAX, every device: on. Every layer compiles there (layers.COMPILED_ON_JAX), and an uncompiled
      JAX step runs op by op.
    - TensorFlow on CPUs: off. XLA trained several times slower when measured (model_10 and model_17
      under mixed_bfloat16), and TensorFlow's random-augmentation ops cannot be compiled anyway.
    - TensorFlow on GPUs: Keras' own 'auto' (XLA if every layer supports it).
    """
    if requested in ("on", "off"):
        return requested == "on"
    if device.get("backend") == "jax":
        return True
    return "auto" if device.get("kind") == "GPU" else False


def set_precision(policy: str) -> None:
    """Set the global Keras dtype policy (Keras wraps the optimizer for float16 loss scaling)."""
    import keras

    keras.mixed_precision.set_global_policy(policy)


def seed_everything(seed: int) -> None:
    """Python, NumPy, TensorFlow and Keras' own generators (augmentation layers)."""
    import keras

    keras.utils.set_random_seed(seed)


def prepare(
    threads: int,
    precision: str,
    jit_compile: str,
    seed: int,
    require_gpu: str = "auto",
    deterministic_ops: bool = True,
    keep=None,
) -> dict:
    """Threads, device, precision policy, XLA and seeds for one training job, in the order
    TensorFlow needs them. ``keep(name, value)`` returns the value a resumed job started
    with (threads and precision change the numbers); without it, the given values are used.
    """
    keep = keep or (lambda _, value: value)
    intra, inter = configure_threads(keep("threads", allotted_threads(threads)))
    device = setup_device(require_gpu, deterministic_ops)
    policy = keep("precision_policy", resolve_precision(precision, device))
    set_precision(policy)
    seed_everything(seed)
    return {
        "device": device,
        "precision": policy,
        "jit_compile": resolve_jit(jit_compile, device, policy),
        "threads": {"intra_op": intra, "inter_op": inter},
    }
