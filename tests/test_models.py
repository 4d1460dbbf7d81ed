"""The generic builder: every rung of the ladder has the layers its entry asks for."""

from __future__ import annotations

import copy

import keras
import pytest
import yaml

from cnnstudy import configuration, models, optimizers

from conftest import REPO

CONV_BLOCK = ["Conv2D", "Conv2D", "BatchNormalization", "MaxPooling2D", "Dropout"]
STEM32 = ["Conv2D", "BatchNormalization", "Dropout"]
STEM64 = ["Conv2D", "Conv2D", "BatchNormalization", "MaxPooling2D"]  # MFM-24: no dropout here
HEAD = ["Dense", "Dense"]  # Dense(100) and the Dense(10) output
AUG = ["RandomTranslation", "RandomRotation"]

# Written out from the study's prose (see config.yaml), independently of the builder.
EXPECTED = {
    "model_01": ["Conv2D", "Flatten", *HEAD],
    "model_02": [*STEM32, "Flatten", *HEAD],
    "model_03": [*STEM32, *CONV_BLOCK, *CONV_BLOCK, "Flatten", *HEAD],
    "model_04": [*STEM32, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_05": [*STEM32, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_06": [*STEM32, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_07": [*STEM64, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_08": [*STEM64, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_09": [*AUG, *STEM64, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_10": [*AUG, *STEM64, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
    "model_11": [*AUG, *STEM64, *CONV_BLOCK, *CONV_BLOCK, "GlobalAveragePooling2D", *HEAD],
}
FILTERS = {
    "model_01": [32],
    "model_03": [32, 64, 64, 128, 128],
    "model_07": [64, 64, 128, 128, 256, 256],
    "model_10": [64, 64, 128, 128, 256, 256],
}


@pytest.fixture(scope="module")
def ladder() -> dict:
    with open(REPO / "config.yaml") as fh:
        return configuration.load(yaml.safe_load(fh))


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_rung_has_the_layers_its_entry_asks_for(ladder, name):
    model = models.build_model(ladder[name])
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds == ["InputLayer", *EXPECTED[name]]
    assert model.output_shape == (None, 10)
    out = model.layers[-1]
    assert out.get_config()["activation"] == "softmax" and out.units == 10
    if name in FILTERS:
        assert [layer.filters for layer in model.layers if isinstance(layer, keras.layers.Conv2D)] == FILTERS[name]
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    assert dense[0].units == 100


def test_dropout_rates_follow_the_entry(ladder):
    rates = {
        name: {
            layer.rate for layer in models.build_model(ladder[name]).layers if isinstance(layer, keras.layers.Dropout)
        }
        for name in ("model_02", "model_10", "model_11")
    }
    assert rates == {"model_02": {0.25}, "model_10": {0.25}, "model_11": {0.1}}


def test_optimizers_follow_the_entries(ladder):
    seen = {}
    for name in ("model_01", "model_05", "model_10"):
        model = models.compile_model(models.build_model(ladder[name]), ladder[name], steps_per_epoch=10)
        opt = model.optimizer
        seen[name] = (type(opt).__name__, round(float(opt.learning_rate), 6))
    assert seen == {"model_01": ("SGD", 0.01), "model_05": ("Adam", 0.01), "model_10": ("Adam", 0.001)}


def test_a_twelfth_rung_is_a_config_edit(ladder):
    with open(REPO / "config.yaml") as fh:
        cfg = yaml.safe_load(fh)
    cfg["models"].append(
        {
            "name": "model_12x",
            "base": "model_10",
            "note": "wider head",
            "layers": [
                {"Conv2D": {"filters": 16, "kernel_size": 5}},
                {"GlobalMaxPooling2D": {}},
                {"Dense": {"units": 300, "activation": "gelu"}},
            ],
        }
    )
    spec = configuration.load(cfg)["model_12x"]
    assert spec["optimizer"]["learning_rate"] == 0.001 and spec["batch_size"] == 128
    kinds = [type(layer).__name__ for layer in models.build_model(spec).layers]
    assert kinds == ["InputLayer", *AUG, "Conv2D", "GlobalMaxPooling2D", "Dense", "Dense"]


def test_keras_argument_errors_name_the_model_and_layer(ladder):
    spec = copy.deepcopy(ladder["model_01"])
    spec["layers"] = [{"MaxPooling2D": {"pool_size": [2, 2], "padding": "same"}}, {"Flatten": {}}]
    models.build_model(spec)  # valid
    spec["layers"][0] = {"Activation": {"activation": "relu"}}
    spec["augmentation"] = [{"RandomRotation": {"factor": 0.1, "fill_mode": "wrap"}}]
    models.build_model(spec)
    spec["layers"][0] = {"Conv2D": {"filters": 8, "kernel_size": 3, "strides": [0, 1]}}
    with pytest.raises(configuration.ConfigError, match=r"model model_01: layer 0 Conv2D"):
        models.build_model(spec)


def test_optimizer_arguments_are_checked(ladder):
    spec = copy.deepcopy(ladder["model_10"])
    spec["optimizer"]["nesterov"] = True
    with pytest.raises(configuration.ConfigError, match="optimizer adam takes no 'nesterov'"):
        optimizers.make_optimizer(spec, steps_per_epoch=10)


def test_cosine_schedule_warms_up_then_decays(ladder):
    spec = copy.deepcopy(ladder["model_10"])
    spec.update(epochs=10, schedule={"name": "cosine", "warmup_epochs": 2, "warmup_start": 0.0, "alpha": 0.0})
    opt = optimizers.make_optimizer(spec, steps_per_epoch=10)
    values = []
    for step in (0, 10, 20, 60, 99):
        opt.iterations.assign(step)
        values.append(float(opt.learning_rate))
    assert values[0] == 0.0 and values[1] == pytest.approx(0.0005) and values[2] == pytest.approx(0.001)
    assert values[2] > values[3] > values[4] >= 0.0


def test_batchnorm_momentum_applies_where_a_layer_sets_none(ladder):
    spec = copy.deepcopy(ladder["model_10"])
    spec["batchnorm_momentum"] = 0.9
    spec["layers"] = [*spec["layers"], {"BatchNormalization": {"momentum": 0.5}}]
    moms = [
        layer.momentum
        for layer in models.build_model(spec).layers
        if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert moms == [0.9, 0.9, 0.9, 0.5]
    default = [
        x.momentum
        for x in models.build_model(ladder["model_10"]).layers
        if isinstance(x, keras.layers.BatchNormalization)
    ]
    assert default == [0.99, 0.99, 0.99]
