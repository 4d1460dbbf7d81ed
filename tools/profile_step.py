"""Where a training epoch's time goes: oneDNN's own per-primitive timings, against the machine's peak.

    python tools/profile_step.py --data results/data/cifar10.npz \\
        --spec results/specs/model_10.json --out reports/profile_model_10.md

TensorFlow runs convolutions, pooling, dense layers and layout conversions (reorders) as oneDNN
primitives; with ``ONEDNN_VERBOSE=1`` oneDNN prints one line per executed primitive with its
kind, implementation, data types, shape and milliseconds. This script trains the entry the
workflow's way (its precision, its augmentation layers, cached in-order batches so the input
pipeline is out of the picture) for one untimed epoch, then one profiled epoch, in a child
process with verbose output on, and one more child with it off for the epoch's true wall time.
It sums the primitive times by kind and direction (forward, backward-data, backward-weights),
counts each convolution's FLOPs from its shape (2 per multiply-add), and sets its rate against
the bfloat16/float32 matmul peak measured in the same child. What oneDNN does not run (casts,
TensorFlow's BatchNorm and elementwise kernels, the optimizer's updates) is the rest of the wall
time. Threads: the primitives run on the intra-op pool, so their times are wall-clock times.
The quiet child also traces one more epoch with TensorFlow's profiler and sums the time of every
executed op by the layer it belongs to (conv layers' oneDNN kernels, BatchNormalization's ops,
Dropout's, the augmentation layers', and the rest: gradients' sums, the optimizer), which names
what the oneDNN view leaves as "not oneDNN".
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflow_scripts"))  # the workflow's cnnstudy package

from cnnstudy import cli
from cnnstudy.files import atomic_path

MARK = "=== profiled epoch ==="
SHAPE = re.compile(r"mb(\d+)_?ic(\d+)oc(\d+)_.*?oh(\d+).*?kh(\d+).*?ow(\d+).*?kw(\d+)")


def parse(lines) -> pd.DataFrame:
    """One row per executed primitive: kind, direction, implementation, dtype, shape, ms, FLOPs."""
    rows = []
    for line in lines:
        fields = line.strip().split(",")
        if not fields[0] == "onednn_verbose" or "exec" not in fields[:5]:
            continue
        i = fields.index("exec")
        kind, impl, prop, desc = fields[i + 2], fields[i + 3], fields[i + 4], fields[-2]
        dtype = "bf16" if "bf16" in fields[i + 5] else "f32" if "f32" in fields[i + 5] else fields[i + 5][:12]
        flops = 0.0
        match = SHAPE.search(desc) if kind == "convolution" else None
        if match:
            mb, ic, oc, oh, kh, ow, kw = map(int, match.groups())
            flops = 2.0 * mb * oc * oh * ow * ic * kh * kw
        rows.append(
            {
                "kind": kind,
                "direction": prop,
                "impl": impl,
                "dtype": dtype,
                "shape": desc,
                "ms": float(fields[-1]),
                "flops": flops,
            }
        )
    return pd.DataFrame(rows, columns=["kind", "direction", "impl", "dtype", "shape", "ms", "flops"])


def child(data: str, spec_path: str, images: int, threads: int, precision: str, peak_seconds: float) -> None:
    """Train one untimed and one profiled epoch; print the mark, the primitives, the wall time, the peaks."""
    from cnnstudy import runtime

    runtime.configure_threads(threads)
    import keras
    import numpy as np

    from cnnstudy import datasets, flops, models
    from cnnstudy.files import read_json

    spec = read_json(spec_path)
    device = runtime.setup_device()
    policy = runtime.resolve_precision(precision, device)
    keras.mixed_precision.set_global_policy(policy)
    with np.load(data) as arrays:
        x, y = arrays["x_train"][:images], arrays["y_train"][:images]
    batch = spec["batch_size"]
    x, y = x[: len(x) // batch * batch], y[: len(x) // batch * batch]
    runtime.seed_everything(0)
    model = models.compile_model(models.build_model(spec, train_images=x), spec, len(x) // batch, False)
    batches = datasets.eval_dataset(x, y, batch).cache()
    model.fit(batches, epochs=1, verbose=0)  # tracing, caches, oneDNN's primitive cache
    print(MARK, flush=True)
    start = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    seconds = time.perf_counter() - start
    print(f"=== wall {seconds} images {len(x)} policy {policy}", flush=True)
    for dtype in ("bfloat16", "float32"):
        print(f"=== peak {dtype} {flops.matmul_peak(dtype, seconds=peak_seconds)}", flush=True)
    if os.environ.get("ONEDNN_VERBOSE") != "1":
        for layer, ms in traced_epoch(model, batches).items():
            print(f"=== op {ms} {layer}", flush=True)


def traced_epoch(model, batches) -> dict[str, float]:
    """Milliseconds of every op TensorFlow ran in one epoch, summed by the layer it belongs to."""
    import tempfile

    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2  # the trace's format, shipped with TensorFlow

    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        model.fit(batches, epochs=1, verbose=0)
        tf.profiler.experimental.stop()
        (path,) = glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)
        space = xplane_pb2.XSpace.FromString(Path(path).read_bytes())
    plane = next(p for p in space.planes if p.name == "/host:CPU")
    totals: collections.Counter = collections.Counter()
    for line in plane.lines:
        if not line.name.startswith("tf_Compute"):  # the executor's ops (not Python, not tf.data)
            continue
        for event in line.events:
            name = plane.event_metadata[event.metadata_id].name  # ".../<model>/<layer>_<i>_1/...:<OpType>"
            if ":" not in name or name.startswith("ExecutorState"):
                continue
            scope, op = name.rsplit(":", 1)
            layer = re.search(rf"{re.escape(model.name)}_\d+/([a-z0-9_]+?)(?:_\d+)?_\d+/", scope)
            totals[layer.group(1) if layer else f"outside layers ({op})"] += event.duration_ps / 1e9
    return dict(totals)


def _run_child(args: list[str], verbose: bool) -> str:
    env = {**os.environ, "ONEDNN_VERBOSE": "1" if verbose else "0"}
    proc = subprocess.run([sys.executable, __file__, "--child", *args], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"profiling child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _values(out: str, key: str) -> list[str]:
    prefix = f"=== {key} "
    return next(line[len(prefix) :].split() for line in out.splitlines() if line.startswith(prefix))


def main(
    data: str,
    spec: str,
    out: str,
    images: int = 2048,
    threads: int = 2,
    precision: str = "auto",
    peak_seconds: float = 3.0,
) -> dict:
    args = ["--data", data, "--spec", spec, "--images", str(images), "--threads", str(threads)]
    args += ["--precision", precision, "--peak-seconds", str(peak_seconds)]
    quiet, loud = _run_child(args, verbose=False), _run_child(args, verbose=True)
    wall, _, n, _, policy = _values(quiet, "wall")[:5]
    wall, n, loud_wall = float(wall), int(n), float(_values(loud, "wall")[0])
    peaks = {d: float(_values(quiet, f"peak {d}")[0]) for d in ("bfloat16", "float32")}
    prims = parse(loud.split(MARK, 1)[1].split("=== wall", 1)[0].splitlines())  # the profiled epoch's lines
    if prims.empty:
        raise RuntimeError("oneDNN printed no primitive: is this TensorFlow built with oneDNN (TF_ENABLE_ONEDNN_OPTS)?")
    by_kind, layers = primitive_tables(prims, peaks, loud_wall)
    ops = op_table(quiet)
    conv = prims[prims["kind"] == "convolution"]
    head = [
        f"# Where {Path(spec).stem}'s training epoch goes (oneDNN verbose)",
        "",
        f"{n} images, batch from the spec, {threads} intra-op thread(s), {policy}; cached in-order batches.",
        f"Epoch wall time {wall:.2f} s ({n / wall:.0f} img/s) without verbose output, {loud_wall:.2f} s with it.",
        f"Peaks in the same process: bfloat16 {peaks['bfloat16'] / 1e9:.0f} GFLOP/s, float32 {peaks['float32'] / 1e9:.0f} GFLOP/s.",
        f"Convolutions: {conv['ms'].sum() / 1e3:.2f} s for {conv['flops'].sum() / 1e9:.1f} GFLOP "
        f"({conv['flops'].sum() / (conv['ms'].sum() / 1e3) / 1e9:.0f} GFLOP/s while they run).",
    ]
    with atomic_path(Path(out)) as tmp:
        tmp.write_text(page(head, by_kind, ops, layers))
    result = {"images": n, "wall": wall, "verbose_wall": loud_wall, "peaks": peaks}
    return {**result, "by_kind": by_kind, "convolutions": layers, "by_layer": ops}


def op_table(quiet: str) -> pd.DataFrame:
    """The TensorFlow profiler's time per layer (the child's ``=== op`` lines), longest first, with shares."""
    ops = pd.DataFrame(
        [line[len("=== op ") :].split(" ", 1) for line in quiet.splitlines() if line.startswith("=== op ")],
        columns=["ms", "layer"],
    ).astype({"ms": float})
    ops = ops.sort_values("ms", ascending=False)[["layer", "ms"]]
    ops["share"] = ops["ms"] / ops["ms"].sum()
    return ops


def primitive_tables(prims: pd.DataFrame, peaks: dict, loud_wall: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The profiled epoch's primitives by kind and direction (with the time outside oneDNN), and its
    convolutions by shape; each with its share of the machine's matmul peak for its data type."""
    peak = lambda dtype: peaks["bfloat16" if dtype == "bf16" else "float32"]  # noqa: E731
    by_kind = prims.groupby(["kind", "direction", "dtype"], as_index=False)[["ms", "flops"]].sum()
    outside = max(0.0, loud_wall * 1e3 - prims["ms"].sum())
    by_kind.loc[len(by_kind)] = ["(not oneDNN: casts, TF kernels, optimizer)", "", "", outside, 0.0]
    by_kind["share"] = by_kind["ms"] / (loud_wall * 1e3)
    by_kind["GFLOP/s"] = (by_kind["flops"] / by_kind["ms"] / 1e6).where(by_kind["flops"] > 0)
    by_kind["of peak"] = [
        f / (ms / 1e3) / peak(d) if f else float("nan")
        for f, ms, d in zip(by_kind["flops"], by_kind["ms"], by_kind["dtype"], strict=True)
    ]
    by_kind = by_kind.sort_values("ms", ascending=False)
    layers = (
        prims[prims["kind"] == "convolution"]
        .groupby(["direction", "shape", "impl", "dtype"], as_index=False)[["ms", "flops"]]
        .sum()
    )
    layers["of peak"] = [
        f / (ms / 1e3) / peak(d) for f, ms, d in zip(layers["flops"], layers["ms"], layers["dtype"], strict=True)
    ]
    return by_kind, layers.sort_values("ms", ascending=False)


def page(head: list[str], by_kind: pd.DataFrame, ops: pd.DataFrame, layers: pd.DataFrame) -> str:
    """The Markdown page: ``head``'s lines, then the tables by primitive, by layer (the layers
    under 1 % of the ops' time together) and the convolutions."""
    big = ops["share"] >= 0.01
    shown = pd.concat(
        [
            ops[big],
            pd.DataFrame(
                [
                    {
                        "layer": "(each under 1 %, together)",
                        "ms": ops.loc[~big, "ms"].sum(),
                        "share": ops.loc[~big, "share"].sum(),
                    }
                ]
            ),
        ]
    )
    return "\n".join(
        [
            *head,
            "",
            "## By primitive kind and direction",
            "",
            by_kind.to_markdown(index=False, floatfmt=".3g"),
            "",
            "## By layer (TensorFlow's trace of another epoch)",
            "",
            f"Every op the executor ran, by the layer it belongs to ({ops['ms'].sum() / 1e3:.2f} s of ops).",
            "",
            shown.to_markdown(index=False, floatfmt=".3g"),
            "",
            "## Convolutions, largest first",
            "",
            layers.to_markdown(index=False, floatfmt=".3g"),
            "",
            "share: of the profiled epoch's wall time (verbose on); of peak: the primitive's FLOP/s over the",
            "matmul peak of its data type. Machine, day and load make absolute times vary: read the shares.",
            "",
        ]
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="the preprocessed npz (results/data/cifar10.npz)")
    p.add_argument("--spec", required=True, help="a model spec JSON (results/specs/<model>.json)")
    p.add_argument("--out", default="reports/profile.md")
    p.add_argument("--images", type=int, default=2048, help="training images per epoch")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--precision", default="auto")
    p.add_argument("--peak-seconds", type=float, default=3.0, help="how long each matmul peak is measured")
    return p


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:  # the profiled process main() starts
        a = parser().parse_args(sys.argv[2:])
        child(a.data, a.spec, a.images, a.threads, a.precision, a.peak_seconds)
    else:
        sys.exit(cli.run(main, parser()))
