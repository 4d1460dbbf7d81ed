"""Where and how TensorFlow runs: threads, device, precision policy, seeds."""

from __future__ import annotations

import logging
import os
import platform

log = logging.getLogger("cnnstudy.runtime")

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


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
    sequential graph. Call before TensorFlow runs any op.
    """
    import tensorflow as tf

    intra = allotted_threads(threads)
    inter = 1
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


def resolve_precision(requested: str, device: dict, cpu_flags: set[str] | None = None) -> str:
    """The Keras dtype policy for ``requested`` ('auto' or an explicit policy).

    auto: mixed_bfloat16 on GPUs of compute capability >= 8 and on CPUs with bf16
    instructions (AVX512-BF16, AMX); mixed_float16 (with loss scaling) on older GPUs;
    float32 otherwise.
    """
    if requested != "auto":
        return requested
    if device.get("kind") == "GPU":
        major = (device.get("compute_capability") or [0])[0]
        return "mixed_bfloat16" if major >= 8 else "mixed_float16"
    flags = cpu_info()[1] if cpu_flags is None else cpu_flags
    return "mixed_bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


def resolve_jit(requested: str, device: dict, policy: str) -> bool | str:
    """XLA for ``model.compile(jit_compile=...)``: 'on' True, 'off' False, 'auto' as measured.

    auto: off on CPU, where XLA trained several times slower when measured (model_10 and
    model_17 under mixed_bfloat16) and where Keras' random-augmentation layers
    cannot be compiled anyway; on GPUs, Keras' own 'auto' (XLA if every layer supports it).
    """
    if requested in ("on", "off"):
        return requested == "on"
    return "auto" if device.get("kind") == "GPU" else False


def set_precision(policy: str) -> None:
    """Set the global Keras dtype policy (Keras wraps the optimizer for float16 loss scaling)."""
    import keras

    keras.mixed_precision.set_global_policy(policy)


def seed_everything(seed: int) -> None:
    """Python, NumPy, TensorFlow and Keras' own generators (augmentation layers)."""
    import keras

    keras.utils.set_random_seed(seed)


def prepare(threads: int, precision: str, jit_compile: str, seed: int, require_gpu: str = "auto",
            deterministic_ops: bool = True, keep=None) -> dict:  # fmt: skip
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
