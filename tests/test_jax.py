"""Keras' JAX backend (backend: jax): every entry compiles with XLA, augmentation draws from
(seed, epoch), the same seed gives the same numbers, a killed job resumes bit for bit, and the
tiny DAG trains, evaluates and reports with no TensorFlow imported in its jobs.

Keras fixes its backend per process, and this test process runs TensorFlow: every JAX run here is
a process of its own, started with a site hook (``BLOCK_TENSORFLOW``) that refuses and records any
import of TensorFlow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from conftest import (
    REPO,
    SCRIPTS,
    TINY,
    TWO_AT_ONCE,
    copy_workdir,
    entry_with,
    require_mirror,
    saved_epoch,
    saved_weights,
    snakemake,
    train_cli,
    wait_for_epoch,
)

BLOCK_TENSORFLOW = textwrap.dedent('''
    import os, sys

    class BlockTensorFlow:
        """Refuses TensorFlow; records which file asked (Keras probes for it where it is optional)."""

        def find_spec(self, name, path=None, target=None):
            if name == "tensorflow" or name.startswith("tensorflow."):
                frame = sys._getframe(1)
                while frame and ("importlib" in frame.f_code.co_filename or "<frozen" in frame.f_code.co_filename):
                    frame = frame.f_back
                with open(os.environ["TF_IMPORT_LOG"], "a") as log:
                    log.write(f"{frame.f_code.co_filename if frame else '?'}\\t{name}\\n")
                raise ImportError(f"{name}: TensorFlow is blocked in this JAX job (tests/test_jax.py)")
            return None

    sys.meta_path.insert(0, BlockTensorFlow())
''')


def ours_imported_tensorflow(env: dict) -> list[str]:
    """The attempts to import TensorFlow that came from the workflow's own code (not Keras' probes)."""
    lines = Path(env["TF_IMPORT_LOG"]).read_text().splitlines()
    return [line for line in lines if str(SCRIPTS) in line.split("\t")[0]]


@pytest.fixture(scope="module")
def jax_env(tmp_path_factory) -> dict:
    """Environment of a JAX process that may not import TensorFlow (attempts go to TF_IMPORT_LOG).

    The module's JAX processes share XLA's persistent compilation cache: a process that compiles
    what another one compiled loads the executable instead (a 2-epoch tiny model_10 job: 54 s
    compiling, 25 s loading, on this 2-core CPU). It is the executable compiling gives, so no number
    changes: the resume test compares a rerun that loads it with a run that compiled it, bit for bit.
    """
    hook = tmp_path_factory.mktemp("block_tensorflow")
    (hook / "sitecustomize.py").write_text(BLOCK_TENSORFLOW)
    log = hook / "tensorflow_imports.log"
    log.touch()
    path = os.pathsep.join([str(hook), str(SCRIPTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cache = {
        "JAX_COMPILATION_CACHE_DIR": str(tmp_path_factory.mktemp("jax_compilation_cache")),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    return {**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": path, "TF_IMPORT_LOG": str(log), **cache}


def run_jax(code: str, env: dict, timeout: float = 900) -> str:
    """Run ``code`` in a JAX process of its own, in the repository (config.yaml), TensorFlow blocked."""
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not ours_imported_tensorflow(env)
    return proc.stdout


def test_every_entry_compiles_with_xla_on_jax(jax_env):
    out = run_jax(
        """
        import json, yaml, numpy as np, keras
        from cnnstudy import configuration, models
        assert keras.backend.backend() == "jax"
        entries = configuration.load(yaml.safe_load(open("config.yaml")))
        images = np.random.default_rng(0).random((64, 32, 32, 3), dtype="float32")
        result = {}
        for name, entry in entries.items():
            spec = configuration.training_part(entry)
            if spec.get("backbone"):
                spec["backbone"] = {**spec["backbone"], "weights": "none"}
            model = models.build_model(spec, train_images=images)
            models.compile_model(model, spec, steps_per_epoch=10, jit_compile=True)
            result[name] = [model.jit_compile, sorted({type(l).__name__ for l in model._flatten_layers() if "Random" in type(l).__name__})]
        print(json.dumps(result))
    """,
        jax_env,
    )
    result = json.loads(out.splitlines()[-1])
    assert len(result) == 18 and all(jit for jit, _ in result.values()), result
    assert result["model_10"][1] == ["CompiledRandomRotation", "CompiledRandomTranslation"]
    assert result["model_17"][1] == ["CompiledRandomTranslation", "RandomFlip"]  # RandomFlip compiles as it is


def test_augmentation_on_jax_keeps_shapes_and_ranges_and_draws_from_seed_and_epoch(jax_env):
    out = run_jax(
        """
        import json, jax, numpy as np, keras, yaml
        from cnnstudy import configuration, models, training
        spec = configuration.training_part(configuration.load(yaml.safe_load(open("config.yaml")))["model_10"])
        model = models.build_model(spec)
        layers = [model.get_layer(f"{n.lower()}_{i}") for i, n in enumerate(["RandomTranslation", "RandomRotation"])]
        images = np.random.default_rng(1).random((16, 32, 32, 3), dtype="float32")
        seeds = training.EpochSeeds(seed=3)
        seeds.set_model(model)

        @jax.jit
        def run(states, x):  # as the compiled train step calls the layers: stateless, seed states in
            for layer, state in zip(layers, states):
                x, _ = layer.stateless_call([], state, x, training=True)
            return x

        def draw(epoch):
            seeds.on_epoch_begin(epoch)
            return np.asarray(run([[v.value for v in l.non_trainable_variables] for l in layers], images))

        a, b, c = draw(4), draw(4), draw(5)
        print(json.dumps({"shape": list(a.shape), "min": float(a.min()), "max": float(a.max()),
                          "same": bool(np.array_equal(a, b)), "other_epoch": bool(np.array_equal(a, c)),
                          "changed": float(np.abs(a - images).mean())}))
    """,
        jax_env,
    )
    got = json.loads(out.splitlines()[-1])
    assert got["shape"] == [16, 32, 32, 3] and 0.0 <= got["min"] and got["max"] <= 1.0 + 1e-6
    assert got["same"] and not got["other_epoch"] and got["changed"] > 0.01, got


# ---- training on JAX: same seed, same numbers; resume ---------------------------------------------


def _same_run(a: Path, b: Path) -> None:
    timing = ["epoch_time", "images_per_s"]
    ha, hb = (pd.read_csv(r / "history.csv").drop(columns=timing) for r in (a, b))
    pd.testing.assert_frame_equal(ha, hb, check_exact=True)
    wa, wb = saved_weights(a / "model.keras"), saved_weights(b / "model.keras")
    assert len(wa) == len(wb) and all(np.array_equal(x, y) for x, y in zip(wa, wb, strict=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["plain", "early stopping"])
def test_on_jax_the_same_seed_twice_and_a_killed_job_resumed_give_the_same_run(
    kind, jax_env, tiny_data, ladder_specs, tmp_path
):
    spec = (
        entry_with(ladder_specs, "model_01", epochs=3, batch_size=64, backend="jax")
        if kind == "plain"
        else entry_with(
            ladder_specs, "model_10", epochs=6, batch_size=64, early_stopping={"patience": 1}, backend="jax"
        )
    )
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    runs = {name: tmp_path / name for name in ("first", "second", "resumed")}
    for run in runs.values():
        run.mkdir()
    # Started together (one thread each): the run to kill, and the uninterrupted run(s) to compare.
    with open(runs["resumed"] / "killed.log", "w") as log:
        proc = subprocess.Popen(
            train_cli(tiny_data, spec_file, runs["resumed"], seed=1), env=jax_env, stdout=log, stderr=subprocess.STDOUT
        )
    # The same seed twice, as its own check, on the cheap entry; on model_10 the resumed run's
    # equality with the uninterrupted one already needs every epoch's draws to repeat across processes.
    whole = ("first", "second") if kind == "plain" else ("first",)
    uninterrupted = {}
    for name in whole:
        with open(runs[name] / "job.log", "w") as log:
            uninterrupted[name] = subprocess.Popen(
                train_cli(tiny_data, spec_file, runs[name], seed=1), env=jax_env, stdout=log, stderr=subprocess.STDOUT
            )
    # Killed after its first checkpoint, mid-way through the next epoch; rerun below.
    wait_for_epoch(runs["resumed"] / "state", 1, proc, timeout=900)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert saved_epoch(runs["resumed"] / "state") >= 1 and not (runs["resumed"] / "model.keras").exists()
    # Rerun at once, beside the uninterrupted run(s) still training.
    with open(runs["resumed"] / "rerun.log", "w") as log:
        rerun = subprocess.Popen(
            train_cli(tiny_data, spec_file, runs["resumed"], seed=1), env=jax_env, stdout=log, stderr=subprocess.STDOUT
        )
    for name, run in {**uninterrupted, "resumed": rerun}.items():
        log = runs[name] / ("rerun.log" if name == "resumed" else "job.log")
        assert run.wait(timeout=900) == 0, f"{name}: {log.read_text()[-3000:]}"
    if kind == "plain":
        _same_run(runs["first"], runs["second"])
    info = json.loads((runs["first"] / "train_info.json").read_text())
    assert info["backend"] == "jax" and info["device"]["jax"] and info["jit_compile"] is True
    assert "resuming after epoch" in (runs["resumed"] / "rerun.log").read_text()
    _same_run(runs["first"], runs["resumed"])
    assert not ours_imported_tensorflow(jax_env)


# ---- the tiny DAG on JAX ------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_tiny_dag_trains_evaluates_and_reports_on_jax_without_tensorflow(jax_env, tiny_prepared, tmp_path):
    work = copy_workdir(tiny_prepared, tmp_path / "work")
    extra = work / "jax.yaml"
    extra.write_text(yaml.safe_dump({"backend": "jax", "run_models": ["model_01", "model_10", "model_18"]}))
    args = ["--directory", str(work), "--configfile", TINY, str(extra), "--config", f"data_source={require_mirror()}"]
    # The jobs choose the backend from their spec; PATH stays snakemake()'s (the test environment first).
    env = {k: v for k, v in jax_env.items() if k not in ("KERAS_BACKEND", "PATH")}
    snakemake("tables", *args, *TWO_AT_ONCE, env=env)
    results = work / "results" / "tiny"
    for name in ("model_01", "model_10", "model_18"):
        spec = json.loads((results / "specs" / f"{name}.json").read_text())
        metrics = json.loads((results / "metrics" / name / "seed_0" / "metrics.json").read_text())
        info = json.loads((results / "models" / name / "seed_0" / "train_info.json").read_text())
        assert spec["backend"] == "jax" and info["backend"] == "jax" and info["jit_compile"] is True
        assert metrics["provenance"]["device"]["backend"] == "jax" and 0 <= metrics["test"]["accuracy"] <= 1
    assert set(pd.read_csv(work / "reports" / "tiny" / "table1.csv")["model"]) == {"model_01", "model_10", "model_18"}
    assert not ours_imported_tensorflow(jax_env)
