"""Transfer learning: backbone builders, weight files, fetching ahead (two-phase fine-tuning: its
run is the resume matrix's two-phase reference, tests/test_resume.py).

ImageNet weights cannot be downloaded where these tests run: backbones use random weights
or weight files the tests write themselves.
"""

from __future__ import annotations

import copy
import hashlib
import json
import urllib.request

import fetch_weights
import keras
import numpy as np
import pytest
import train

from cnnstudy import models, weights
from cnnstudy.errors import ConfigError, JobError


def _spec(ladder_specs, model, **backbone):
    spec = copy.deepcopy(ladder_specs[model])
    spec["backbone"].update({"weights": "none", **backbone})
    return spec


def _head_only(model):
    """Names of the (innermost) layers that own the model's trainable weights."""

    def walk(layers):
        for layer in layers:
            yield from walk(getattr(layer, "layers", []))
            yield layer

    owners = {}
    for layer in walk(model.layers):
        for w in layer.trainable_weights:
            owners.setdefault(id(w), layer.name)
    return {owners[id(w)] for w in model.trainable_weights}


@pytest.mark.parametrize(
    "name, backbone, size",
    [("model_12", "VGG16", 32), ("model_14", "ResNet50", 32), ("model_15", "InceptionV3", 75)],
)
def test_frozen_backbone_trains_only_the_head(tiny_data, ladder_specs, name, backbone, size):
    spec = _spec(ladder_specs, name)
    model = models.build_model(spec)
    base = model.get_layer("backbone")
    assert base.name == "backbone" and base.input_shape[1:3] == (size, size)
    kinds = [type(layer).__name__ for layer in model.layers]
    assert kinds[:4] == [
        "InputLayer",
        "RandomRotation",
        "RandomFlip",
        "Resizing" if size != 32 else "BackbonePreprocess",
    ]
    assert model.get_layer("backbone_preprocess").backbone == backbone
    assert _head_only(model) == {"predictions"}  # GAP has no weights; the backbone none trainable
    assert not any(layer.trainable for layer in base.layers)

    with np.load(tiny_data) as data:
        x, y = data["x_train"][:16], data["y_train"][:16]
    models.compile_model(model, spec, steps_per_epoch=1)
    before = [w.copy() for w in model.get_layer("predictions").get_weights()]
    frozen = [w.copy() for w in base.get_weights()]
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert not np.allclose(before[0], model.get_layer("predictions").get_weights()[0])
    # Frozen and in inference mode: not even BatchNormalization statistics move.
    assert all(np.array_equal(a, b) for a, b in zip(frozen, base.get_weights(), strict=True))


def test_last_n_layers_unfrozen(ladder_specs):
    spec = _spec(ladder_specs, "model_16")
    model = models.build_model(spec)
    base = model.get_layer("backbone")
    trainable = [layer.name for layer in base.layers if layer.trainable]
    assert trainable == [layer.name for layer in base.layers[-4:]]
    assert trainable == ["block5_conv1", "block5_conv2", "block5_conv3", "block5_pool"]
    assert _head_only(model) == {"predictions", "block5_conv1", "block5_conv2", "block5_conv3"}
    models.set_backbone_trainable(model, "all")
    assert all(layer.trainable for layer in base.layers)


def test_unknown_backbone_is_a_clear_error(ladder_specs):
    spec = _spec(ladder_specs, "model_12", name="VGG17")
    with pytest.raises(ConfigError, match="backbone 'VGG17' is not a keras.applications model"):
        models.build_model(spec)


def test_backbone_loads_exactly_the_given_weights_file(ladder_specs, tmp_path):
    source = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16.weights.h5"
    source.save_weights(path)
    spec = _spec(ladder_specs, "model_12", weights=str(path))
    model = models.build_model(spec, weights_path=str(path))
    for expected, actual in zip(source.get_weights(), model.get_layer("backbone").get_weights(), strict=True):
        np.testing.assert_array_equal(expected, actual)

    corrupt = tmp_path / "corrupt.weights.h5"
    corrupt.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(ConfigError, match=r"cannot load VGG16 weights from .*corrupt\.weights\.h5"):
        models.build_model(spec, weights_path=str(corrupt))


def test_keras_names_and_hashes_are_discovered():
    src = weights.keras_source("VGG16")
    assert src["fname"] == "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"
    assert src["file_hash"] == "6d6bbae143d832006294945121d1f1fc"
    assert src["origin"].startswith("https://storage.googleapis.com/")
    assert (
        weights.keras_source("InceptionV3", 75)["fname"] == "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
    )
    assert weights.keras_source("ResNet50")["fname"] == "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture()
def fake_keras_file(tmp_path, monkeypatch):
    """Pretend Keras' VGG16 file is one we wrote, served from an unreachable origin."""
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(32, 32, 3))
    blob_path = tmp_path / "made.weights.h5"
    base.save_weights(blob_path)
    digest = hashlib.sha256(blob_path.read_bytes()).hexdigest()
    fname = "vgg16_test_notop.weights.h5"
    monkeypatch.setattr(
        weights,
        "keras_source",
        lambda name, size=32: {
            "backbone": name,
            "fname": fname,
            "origin": f"http://127.0.0.1:9/{fname}",
            "file_hash": digest,
        },
    )
    return blob_path, fname, digest


def test_fetch_with_a_filled_cache_does_not_touch_the_network(fake_keras_file, tmp_path, monkeypatch):
    blob_path, fname, digest = fake_keras_file
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fname).write_bytes(blob_path.read_bytes())

    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlretrieve", no_network)
    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    info = fetch_weights.main("VGG16", str(cache), str(tmp_path / "VGG16-32px.json"))
    assert info["path"] == str(cache / fname) and info["file_hash"] == digest
    assert json.loads((tmp_path / "VGG16-32px.json").read_text())["fname"] == fname


def test_fetch_from_an_unreachable_origin_fails_clearly(fake_keras_file, tmp_path):
    _, fname, _ = fake_keras_file
    with pytest.raises(JobError, match=rf"VGG16: could not fetch ImageNet weights {fname} from http://127.0.0.1:9/"):
        fetch_weights.main("VGG16", str(tmp_path / "cache"), str(tmp_path / "m.json"))
    assert not (tmp_path / "m.json").exists()
    assert not list((tmp_path / "cache").glob("*.h5"))


def test_fetch_from_a_mirror(fake_keras_file, tmp_path):
    blob_path, fname, _ = fake_keras_file
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    (mirror / fname).write_bytes(blob_path.read_bytes())
    info = fetch_weights.main("VGG16", str(tmp_path / "cache"), str(tmp_path / "m.json"), mirror=mirror.as_uri())
    assert (tmp_path / "cache" / fname).read_bytes() == blob_path.read_bytes()
    assert weights.verified_path(info) == info["path"]


def test_training_uses_the_cached_file_and_refuses_a_corrupt_one(fake_keras_file, tiny_data, ladder_specs, tmp_path):
    blob_path, fname, digest = fake_keras_file
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / fname).write_bytes(blob_path.read_bytes())
    manifest = tmp_path / "VGG16-32px.json"
    fetch_weights.main("VGG16", str(cache), str(manifest))
    spec = _spec(ladder_specs, "model_12", weights="imagenet")
    spec.update(epochs=1, batch_size=64)
    outs = {
        k: str(tmp_path / f) for k, f in (("model_out", "m.keras"), ("history_out", "h.csv"), ("info_out", "i.json"))
    }
    info = train.main(str(tiny_data), spec, **outs, state_dir=str(tmp_path / "s"), weights_manifest=str(manifest))
    assert info["backbone_weights"] == str(cache / fname)
    trained = keras.saving.load_model(outs["model_out"]).get_layer("backbone")
    np.testing.assert_array_equal(
        trained.get_weights()[0],
        keras.applications.VGG16(include_top=False, weights=str(blob_path), input_shape=(32, 32, 3)).get_weights()[0],
    )

    (cache / fname).write_bytes(b"not weights")
    with pytest.raises(JobError, match=rf"ImageNet weights file .*{fname} is corrupt \(hash .*, expected {digest}\)"):
        train.main(str(tiny_data), spec, **outs, state_dir=str(tmp_path / "s"), weights_manifest=str(manifest))
    (cache / fname).unlink()
    with pytest.raises(JobError, match=r"is missing; run `snakemake weights"):
        train.main(str(tiny_data), spec, **outs, state_dir=str(tmp_path / "s"), weights_manifest=str(manifest))


# Two-phase fine-tuning (phase 2 unfreezes the backbone and trains it at its own learning rate) is
# checked on the resume matrix's two-phase reference run, which is such a run (tests/test_resume.py).
