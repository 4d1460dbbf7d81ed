"""Config validation (schema, defaults, inheritance) and the pinned environments."""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml

from cnnstudy import configuration
from cnnstudy.errors import ConfigError

from conftest import REPO, pins


@pytest.fixture()
def cfg() -> dict:
    with open(REPO / "config.yaml") as fh:
        return yaml.safe_load(fh)


def _load(cfg: dict):
    # YAML anchors share objects between entries; tests mutate a private deep copy.
    return configuration.load(copy.deepcopy(cfg))


def test_the_ladder_resolves_through_inheritance(cfg):
    models = _load(cfg)
    ladder = [name for name, spec in models.items() if spec["table"] == 1][:11]
    assert ladder == [f"model_{i:02d}" for i in range(1, 12)]
    m01, m05, m08, m10, m11 = (models[n] for n in ("model_01", "model_05", "model_08", "model_10", "model_11"))
    assert m01["optimizer"] == {"name": "sgd", "learning_rate": 0.01} and m01["batch_size"] == 512
    assert m05["optimizer"] == {"name": "adam", "learning_rate": 0.01}
    assert m08["batch_size"] == 128 and m08["early_stopping"]["monitor"] == "val_loss"
    assert m10["optimizer"]["learning_rate"] == 0.001 and m10["dropout"] == 0.25
    assert m11["dropout"] == 0.1 and m11["layers"] == m10["layers"]
    # Own keys are not inherited.
    assert m11["published"]["accuracy"] == 0.8127 and m11["note"] == "Reduced dropout"
    assert "published" in m10 and m10["published"] != m11["published"]


def test_defaults_are_filled(cfg):
    for key in ("precision", "run_models", "model_overrides", "seeds"):
        del cfg[key]
    _load_in_place = configuration.load(cfg)
    assert cfg["precision"] == "auto" and cfg["seeds"] == [0] and cfg["run_models"] is None
    assert len(_load_in_place) >= 11


def test_model_overrides_apply_to_every_model(cfg):
    cfg["model_overrides"] = {"epochs": 2, "batch_size": 64}
    models = _load(cfg)
    assert {(m["epochs"], m["batch_size"]) for m in models.values()} == {(2, 64)}


def test_run_models_selects(cfg):
    cfg["run_models"] = ["model_10", "model_01"]
    assert list(_load(cfg)) == ["model_01", "model_10"]  # table order is kept


def test_strings_that_spell_numbers_are_read_as_numbers(cfg):
    """As Snakemake's --config passes nested values: all strings."""
    cfg = copy.deepcopy(cfg)
    cfg.update(
        val_fraction="0.2", seeds=["1", "2"], model_overrides={"epochs": "3", "optimizer": {"learning_rate": "1e-3"}}
    )
    models = configuration.load(cfg)
    assert cfg["val_fraction"] == 0.2 and cfg["seeds"] == [1, 2]
    assert models["model_01"]["epochs"] == 3 and models["model_05"]["optimizer"]["learning_rate"] == 0.001
    assert models["model_01"]["seeds"] == [1, 2] and models["model_10"]["seeds"] == [0, 1, 2]  # an entry's own win


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda c: c.update(bogus=1), r"<top level>: unknown key\(s\) 'bogus'"),
        (lambda c: c.update(val_fraction="a tenth"), r"val_fraction: 'a tenth' is not of type 'number'"),
        (
            lambda c: c.update(model_overrides={"epochs": "2.5"}),
            r"model_overrides.epochs: 2.5 is not of type 'integer'",
        ),
        (lambda c: c.update(val_fraction=1.5), r"val_fraction: 1.5 is greater than or equal to the maximum of 1"),
        (lambda c: c["subset"].update(train=-5), r"subset.train: -5 is less than the minimum of 1"),
        (lambda c: c.update(seeds=[]), r"seeds: \[\] should be non-empty"),
        (lambda c: c.update(precision="fp8"), r"precision: 'fp8' is not one of"),
        (
            lambda c: c["models"][1].update(epochs=-1),
            r"models\[1\] \(model_02\).epochs: -1 is less than the minimum of 1",
        ),
        (lambda c: c["models"][0].update(epochs=1.5), r"epochs: 1.5 is not of type 'integer'"),
        (lambda c: c["models"][0].update(batch_size=0), r"batch_size: 0 is less than the minimum of 1"),
        (
            lambda c: c["models"][0].update(layers=[{"Conv3D": {"filters": 8}}]),
            r"models\[0\] \(model_01\).layers\[0\]: unknown key\(s\) 'Conv3D'; allowed: .*Conv2D",
        ),
        (
            lambda c: c["models"][0].update(layers=[{"Conv2D": {"filters": -3}}]),
            r"layers\[0\].Conv2D.filters: -3 is less than the minimum of 1",
        ),
        (
            lambda c: c["models"][0].update(layers=[[{"Dense": {"units": 0}}]]),
            r"layers\[0\]\[0\].Dense.units: 0 is less than the minimum of 1",
        ),
        (lambda c: c["models"][0]["optimizer"].update(name="adagrad"), r"optimizer.name: 'adagrad' is not one of"),
        (
            lambda c: c["models"][4].update(base="model_99"),
            r"models \(model_05\): base 'model_99' is not an earlier model",
        ),
        (lambda c: c["models"][0].update(base="model_05"), r"base 'model_05' is not an earlier model"),
        (lambda c: c.update(run_models=["model_99"]), r"run_models: unknown model name\(s\) 'model_99'"),
        (lambda c: c["models"].append(dict(c["models"][0])), r"duplicate model name 'model_01'"),
        (lambda c: c["models"][0].pop("optimizer"), r"model model_01 after inheritance.*'optimizer' is a required"),
        (lambda c: c.update(model_overrides={"epochs": 0}), r"model_overrides.epochs: 0 is less than the minimum"),
    ],
)
def test_bad_config_is_rejected_with_a_readable_message(cfg, mutate, message):
    cfg = copy.deepcopy(cfg)
    mutate(cfg)
    with pytest.raises(ConfigError) as info:
        configuration.load(cfg)
    assert re.search(message, str(info.value), re.S), str(info.value)


def test_every_problem_is_listed_once(cfg):
    cfg = copy.deepcopy(cfg)
    cfg["models"][1]["epochs"] = -1
    cfg["models"][1]["learning_rat"] = 0.1
    with pytest.raises(ConfigError) as info:
        configuration.load(cfg)
    text = str(info.value)
    assert "(2 problem(s))" in text
    assert "unknown key(s) 'learning_rat'" in text and "unknown key(s) 'epochs'" not in text


def test_spec_hash_is_stable_and_sensitive(cfg):
    models = _load(cfg)
    again = _load(cfg)
    assert configuration.spec_hash(models["model_10"]) == configuration.spec_hash(again["model_10"])
    changed = copy.deepcopy(models["model_10"])
    changed["optimizer"]["learning_rate"] = 0.002
    assert configuration.spec_hash(changed) != configuration.spec_hash(models["model_10"])


def test_settings_added_later_stay_out_of_the_spec_while_off(cfg):
    """alternating_flip / drop_last: an entry that does not use them keeps the spec it had before they existed."""
    models = _load(cfg)
    assert models["model_10"]["alternating_flip"] is False  # filled for every reader of the entry
    part = configuration.training_part(models["model_10"])
    assert "alternating_flip" not in part and "drop_last" not in part
    assert configuration.training_part(models["model_18"])["alternating_flip"] is True
    turned_on = copy.deepcopy(models["model_10"])
    turned_on["drop_last"] = True
    assert configuration.spec_hash(turned_on) != configuration.spec_hash(models["model_10"])


def test_conda_envs_pin_the_same_versions_as_requirements():
    requirements = pins((REPO / "requirements.txt").read_text().splitlines())
    gpu = pins((REPO / "requirements-gpu.txt").read_text().splitlines())
    assert gpu == {"tensorflow": requirements["tensorflow"]}, (
        "requirements-gpu.txt: the GPU build of the same TensorFlow"
    )
    envs = sorted((REPO / "envs").glob("*.yaml"))
    assert envs, "no conda environment files"
    for env_file in envs:
        env = yaml.safe_load(env_file.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict) and "pip" in d)
        for name, version in pins(pip).items():
            assert requirements.get(name) == version, f"{env_file.name}: {name}=={version} vs requirements.txt"
        assert "python=3.11" in env["dependencies"]


def test_under_ci_a_missing_mirror_fails_the_session(tmp_path):
    """CI=true: a test whose prerequisite is missing fails, naming it; locally it is skipped."""
    import subprocess
    import sys

    test = "tests/test_workflow_run.py::test_nothing_to_do_after_the_run"
    # Each inner session's temporary files under this test's: in pytest's numbered folders, an
    # inner session's cleanup (it keeps the last three) could delete the outer session's.
    env = {**os.environ, "CIFAR10_ARCHIVE": str(tmp_path / "hidden.tar.gz")}
    ci = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "nested"), test],
        cwd=REPO,
        env={**env, "CI": "true"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ci.returncode != 0 and "CI=true and the real CIFAR-10 mirror is not at" in ci.stdout, ci.stdout[-2000:]
    local = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rs",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "nested"),
            test,
        ],
        cwd=REPO,
        env={**env, "CI": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert local.returncode == 0 and "SKIPPED" in local.stdout and "mirror is not at" in local.stdout, local.stdout[
        -2000:
    ]
