"""Speed features: precision policy, XLA choice, the tf.data pipeline, the fast rung model_17."""

from __future__ import annotations

import copy
import json

import evaluate
import keras
import numpy as np
import pandas as pd
import pytest
import train
from test_train import _outputs

from cnnstudy import datasets, layers, models, optimizers, predict, runtime
from cnnstudy.errors import ConfigError

CPU = {"kind": "CPU", "name": "test CPU"}


@pytest.mark.parametrize(
    ("device", "flags", "expected"),
    [
        (CPU, {"avx512f", "avx512_bf16"}, "mixed_bfloat16"),
        (CPU, {"amx_bf16", "avx2"}, "mixed_bfloat16"),
        (CPU, {"avx2", "avx512f"}, "float32"),
        ({"kind": "GPU", "compute_capability": [8, 0]}, set(), "mixed_bfloat16"),  # A100
        ({"kind": "GPU", "compute_capability": [9, 0]}, set(), "mixed_bfloat16"),  # H100
        ({"kind": "GPU", "compute_capability": [7, 0]}, set(), "mixed_float16"),  # V100
        ({"kind": "GPU", "compute_capability": [6, 1]}, {"avx512_bf16"}, "mixed_float16"),  # GPU wins over CPU
    ],
)
def test_auto_precision_follows_the_hardware(device, flags, expected):
    assert runtime.resolve_precision("auto", device, cpu_flags=flags) == expected


def test_explicit_precision_is_kept():
    assert runtime.resolve_precision("float32", {"kind": "GPU", "compute_capability": [9, 0]}) == "float32"


def test_auto_jit_as_measured():
    assert runtime.resolve_jit("auto", CPU, "mixed_bfloat16") is False
    assert runtime.resolve_jit("auto", CPU, "float32") is False
    assert runtime.resolve_jit("auto", {"kind": "GPU"}, "mixed_float16") == "auto"  # Keras decides
    assert runtime.resolve_jit("off", CPU, "mixed_bfloat16") is False
    assert runtime.resolve_jit("on", CPU, "float32") is True


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_models_output_float32(ladder_specs, policy):
    keras.mixed_precision.set_global_policy(policy)
    try:
        for name in ("model_10", "model_17"):
            model = models.build_model(ladder_specs[name])
            conv = next(layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D))
            assert conv.compute_dtype == policy.split("_")[1]
            out = model(np.zeros((2, 32, 32, 3), "float32"))
            assert model.output.dtype == "float32" and out.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def _batches(ds):
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds], strict=True)
    return xs, ys


def test_train_dataset_orders_each_epoch_from_seed_and_epoch_alone():
    rng = np.random.default_rng(0)
    x = rng.random((100, 32, 32, 3), dtype=np.float32)
    labels = np.arange(100) % 10
    y = np.eye(10, dtype=np.float32)[labels]
    xs, ys = _batches(datasets.train_dataset(x, y, batch_size=32, seed=5, first_epoch=0, epochs=2))
    assert [len(b) for b in xs] == [32, 32, 32, 4] * 2  # an epoch's short batch never mixes epochs
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    # every image exactly once per epoch, still paired with its own label
    order = [int(np.flatnonzero((x == img).all(axis=(1, 2, 3)))[0]) for img in x_all]
    assert sorted(order[:100]) == sorted(order[100:]) == list(range(100))
    assert order[:100] != list(range(100)) and order[:100] != order[100:]  # shuffled, anew each epoch
    assert np.array_equal(y_all, y[order])
    assert order[:100] == datasets.epoch_order(5, 0, 100).tolist()
    # A job resumed at epoch 1 sees exactly what an uninterrupted one sees in epoch 1.
    resumed, _ = _batches(datasets.train_dataset(x, y, batch_size=32, seed=5, first_epoch=1, epochs=2))
    assert np.array_equal(np.concatenate(resumed), x_all[100:])
    assert datasets.epoch_order(6, 0, 100).tolist() != order[:100]  # another seed, another order


def test_train_dataset_alternating_flip_and_drop_last():
    rng = np.random.default_rng(3)
    x = rng.random((100, 32, 32, 3), dtype=np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(100) % 10]
    plain, _ = _batches(datasets.train_dataset(x, y, batch_size=32, seed=5, epochs=3))
    got, _ = _batches(datasets.train_dataset(x, y, 32, 5, 0, 3, drop_last=True, alternating_flip=True))
    assert [len(b) for b in got] == [32, 32, 32] * 3  # the short batch of each epoch left out
    assert datasets.steps_per_epoch(100, 32, drop_last=True) == 3 and datasets.steps_per_epoch(100, 32) == 4
    mask = datasets.flip_mask(5, 100)
    assert 30 < mask.sum() < 70  # about half
    for epoch in range(3):
        order = datasets.epoch_order(5, epoch, 100)[:96]  # the same order, its tail dropped
        images = np.concatenate(got[3 * epoch : 3 * epoch + 3])
        flipped = mask[order] ^ bool(epoch % 2)  # a random half, then the other way round
        assert np.array_equal(images[flipped], x[order][flipped][:, :, ::-1])
        assert np.array_equal(images[~flipped], x[order][~flipped])
        assert np.array_equal(np.concatenate(plain[4 * epoch : 4 * epoch + 3]), x[order])
    # resumed at epoch 1: the same flips
    resumed, _ = _batches(datasets.train_dataset(x, y, 32, 5, 1, 3, drop_last=True, alternating_flip=True))
    assert np.array_equal(np.concatenate(resumed), np.concatenate(got[3:]))


def test_eval_dataset_keeps_order():
    x = np.random.default_rng(1).random((70, 32, 32, 3), dtype=np.float32)
    got = np.concatenate([b.numpy() for b in datasets.eval_dataset(x, None, batch_size=32)])
    assert np.array_equal(got, x)


def test_augmentation_keeps_shapes_and_ranges(ladder_specs):
    model = models.build_model(ladder_specs["model_17"])
    x = np.random.default_rng(2).random((16, 32, 32, 3), dtype=np.float32)
    out = x
    for layer in model.layers[1:3]:  # RandomFlip, RandomTranslation
        out = layer(out, training=True)
    out = keras.ops.convert_to_numpy(out)
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1 and not np.allclose(out, x)


def test_patch_whitening_whitens_the_training_patches(tiny_data):
    with np.load(tiny_data) as arrays:
        x = arrays["x_train"]
    layer = layers.PatchWhitening(kernel_size=2, epsilon=1e-8, samples=400)
    layer.build((None, 32, 32, 3))
    layer.adapt(x)
    out = keras.ops.convert_to_numpy(layer(x))
    assert out.shape == (400, 31, 31, 24)
    half = out[..., :12].reshape(-1, 12)  # the other 12 channels are the negatives
    assert np.allclose(out[..., 12:], -out[..., :12], atol=1e-4)
    assert np.allclose(np.cov(half, rowvar=False), np.eye(12), atol=0.02)
    assert np.abs(half.mean(axis=0)).max() < 0.01  # centred by the bias, as on normalised inputs
    assert layer.bias.trainable and not layer.kernel.trainable


def test_bias_learns_lr_multiplier_times_faster():
    x, y = np.zeros((4, 3), "float32"), np.ones((4, 3), "float32")
    moved = {}
    for multiplier in (1.0, 64.0):
        layer = layers.Bias(lr_multiplier=multiplier)
        model = keras.Sequential([keras.Input((3,)), layer])
        model.compile(optimizer=keras.optimizers.SGD(0.001), loss="mse")
        model.train_on_batch(x, y)
        moved[multiplier] = keras.ops.convert_to_numpy(model(x))[0]  # = the bias in use
    # Mean squared error of 0 vs 1 over 4 x 3 values: gradient -2/3 per channel, so one plain
    # SGD step moves the bias by lr * 2/3, and 64 times as far with the multiplier.
    assert np.allclose(moved[1.0], 0.001 * 2 / 3, rtol=1e-4) and np.allclose(moved[64.0], 64 * 0.001 * 2 / 3, rtol=1e-4)


@pytest.mark.parametrize(("channels_in", "channels_out"), [(3, 8), (8, 8), (8, 4)])
def test_dirac_convolutions_start_by_passing_their_inputs_through(channels_in, channels_out):
    keras.utils.set_random_seed(0)
    conv = keras.layers.Conv2D(channels_out, 3, padding="same", use_bias=False, kernel_initializer=layers.Dirac())
    x = np.random.default_rng(0).normal(size=(2, 6, 6, channels_in)).astype("float32")
    out = keras.ops.convert_to_numpy(conv(x))
    n = min(channels_in, channels_out)
    assert np.allclose(out[..., :n], x[..., :n], atol=1e-6)  # identity filters
    if channels_out > n:  # the rest keep PyTorch's uniform(+-1/sqrt(fan in)) init
        rest = keras.ops.convert_to_numpy(conv.kernel)[..., n:]
        assert 0 < np.abs(rest).max() <= 1 / np.sqrt(9 * channels_in)


def test_linear_schedule_is_airbench_triangle(ladder_specs):
    spec = copy.deepcopy(ladder_specs["model_17"])
    spec.update(epochs=10, schedule={"name": "linear", "warmup_epochs": 2, "warmup_start": 0.2, "alpha": 0.1})
    spec["optimizer"]["learning_rate"] = 1.0
    opt = optimizers.make_optimizer(spec, steps_per_epoch=10)
    values = []
    for step in (0, 10, 20, 60, 100):
        opt.iterations.assign(step)
        values.append(float(opt.learning_rate))
    assert values == pytest.approx([0.2, 0.6, 1.0, 0.55, 0.1])


def test_model_17_head_is_bias_free_with_scaled_logits(ladder_specs):
    model = models.build_model(ladder_specs["model_17"])
    assert not model.get_layer("logits").use_bias
    assert model.get_layer("logit_scale").scale == pytest.approx(1 / 9, rel=1e-5)
    probs = keras.ops.convert_to_numpy(model(np.zeros((2, 32, 32, 3), "float32")))
    assert probs.shape == (2, 10) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)


def test_translated_tta_views_move_the_image_one_pixel():
    x = np.arange(2 * 4 * 4 * 1, dtype="float32").reshape(2, 4, 4, 1)
    down_right = predict._shift(x, 1, 1)
    assert np.array_equal(down_right[:, 1:, 1:], x[:, :-1, :-1])
    assert np.array_equal(down_right[:, 0, 1:], x[:, 1, :-1])  # reflected border row
    assert np.array_equal(predict._shift(x, -1, -1)[:, :-1, :-1], x[:, 1:, 1:])


def test_model_17_trains_and_tta_changes_the_predictions(tiny_data, shared_runs, tmp_path):
    # model_17 as the training job trains it, 3 epochs with EMA (conftest.SHARED_RUNS, shared with
    # the resume matrix and test_equivalence.py).
    _, folder = shared_runs["EMA + schedule"]
    out = {"model_out": str(folder / "model.keras"), "history_out": str(folder / "history.csv")}
    out["info_out"] = str(folder / "train_info.json")
    info = json.loads((folder / "train_info.json").read_text())
    history = pd.read_csv(out["history_out"])
    assert history["epoch"].tolist() == [1, 2, 3] and history["test_accuracy"].between(0, 1).all()
    assert info["jit_compile"] is False  # auto on CPU

    model = keras.saving.load_model(out["model_out"])  # PatchWhitening round-trips with its filters
    kernel = keras.ops.convert_to_numpy(model.get_layer("patchwhitening_0").kernel)
    assert np.abs(kernel).max() > 0.1

    with np.load(tiny_data) as arrays:
        x = arrays["x_test"]

    def probs(images, tta):
        return predict.predict_views(model, images, tta)[0]

    plain = probs(x, "none")
    flipped = probs(x[:, :, ::-1], "none")
    assert np.allclose(probs(x, "flip"), (plain + flipped) / 2, atol=1e-5)
    assert np.abs(plain - flipped).max() > 1e-3  # the mirror image is seen differently: TTA matters
    pairs = [probs(predict._shift(x, d, d), "flip") for d in (1, -1)]
    expected = (plain + flipped) / 4 + (pairs[0] + pairs[1]) / 4
    assert np.allclose(probs(x, "flip_translate"), expected, atol=1e-5)

    metrics = tmp_path / "metrics.json"
    evaluate.main(
        str(tiny_data),
        str(tiny_data.with_suffix(".json")),
        out["model_out"],
        out["history_out"],
        out["info_out"],
        str(metrics),
        str(tmp_path / "probs.npz"),
        tta="flip_translate",
    )
    saved = json.loads(metrics.read_text())
    assert saved["tta"] == "flip_translate" and 0 <= saved["test"]["accuracy_without_tta"] <= 1
    assert np.allclose(np.load(tmp_path / "probs.npz")["probs"], expected, atol=1e-4)


def test_benchmark_measures_both_paths_and_writes_its_report(tiny_data, ladder_specs, tmp_path):
    import benchmark

    specs = []
    for name, batch in (("model_17", 50),):  # model_10's paths are the same code
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({**ladder_specs[name], "batch_size": batch}))
        specs.append(str(path))
    out = tmp_path / "benchmark.md"
    result = benchmark.main(
        str(tiny_data),
        str(out),
        specs=specs,
        images=200,
        rounds=1,
        processes=1,
        threads=2,
        concurrency_jobs=[1, 2],
        sections=["paths", "concurrency", "backends"],
        peak_seconds=0.3,  # each of the 3 processes reporting peaks: 2 x 0.3 s, not the default 2 x 3 s
    )
    rows = {row["model"]: row for row in result["models"]}
    assert set(rows) == {"model_17"}
    for row in rows.values():
        for key in ("workflow img/s", "ceiling img/s", "baseline img/s", "eval img/s", "baseline eval img/s"):
            assert row[key] > 0, key
        assert row["pipeline/ceiling"] == pytest.approx(row["workflow img/s"] / row["ceiling img/s"])
        assert row["workflow/baseline"] == pytest.approx(row["workflow img/s"] / row["baseline img/s"])
        assert 0 < row["workflow/peak"] < 2 and row["train GFLOP/img"] > 0 and row["peak bf16/f32"] > 0
    conc = result["concurrency"]
    assert [r["concurrent jobs"] for r in conc] == [1, 2] and [r["threads per job"] for r in conc] == [4, 2]
    assert all(r["TF intra-op threads"] <= runtime.available_cpus() for r in conc)
    text = out.read_text()
    assert "| model_17" in text and "pipeline/ceiling" in text and "## Concurrent training jobs" in text
    assert "## Against the machine's peak" in text and "workflow/peak" in text
    # Both backends side by side, each in its own worker: JAX compiles the whole step (augmentation
    # included) and trains in float32 on this CPU; TensorFlow keeps the CPU job's settings.
    backends = {row["backend"]: row for row in result["backends"]}
    assert list(backends) == ["tensorflow", "jax"] and "## Backends side by side" in text
    assert backends["jax"]["XLA"] is True and backends["jax"]["precision"] == "float32"
    assert (
        backends["tensorflow"]["XLA"] is False and backends["tensorflow"]["precision"] == rows["model_17"]["precision"]
    )
    for row in backends.values():
        assert row["train img/s"] > 0 and 0 < row["of the bf16 peak"] < 2 and row["bf16 peak GFLOP/s"] > 0


def test_keras_speed_times_every_phase_of_each_entry_and_writes_its_report(ladder_specs, tmp_path):
    import keras_speed

    from cnnstudy import flops

    out = tmp_path / "keras_speed.md"
    rows = keras_speed.main(str(out), ["model_01", "model_13"], images=512, rounds=1, peak_size=256)
    # model_13 fine-tunes its VGG16 in a second phase: timed with the backbone unfrozen.
    assert [(r["model"], r["phase"]) for r in rows] == [("model_01", 1), ("model_13", 1), ("model_13", 2)]
    fine_tune = ladder_specs["model_13"]["backbone"]["fine_tune"]
    assert [r["epochs"] for r in rows] == [60, 60, fine_tune["epochs"]]
    assert all(r["train img/s"] > 0 and r["batch size"] == 128 for r in rows[1:])
    model = models.build_model(ladder_specs["model_01"])
    assert rows[0]["train GFLOP/img"] == pytest.approx(flops.TRAIN_FACTOR * flops.forward_flops(model) / 1e9)
    text = out.read_text()
    assert text.count("| model_13 ") == 2 and "of the bfloat16 peak" in text and "min for its epochs" in text
    with pytest.raises(ConfigError, match="unknown model.*model_99"):
        keras_speed.main(str(tmp_path / "bad.md"), ["model_01", "model_99"])
    assert not (tmp_path / "bad.md").exists()


def test_keras_speed_can_time_a_network_without_its_augmentation_layers(ladder_specs, monkeypatch):
    import keras_speed

    built = []
    build = models.build_model
    monkeypatch.setattr(models, "build_model", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    spec = {**ladder_specs["model_09"], "batch_size": 64}
    kept, removed = (keras_speed.time_phases(spec, 64, 1, "mixed_bfloat16", without) for without in (False, True))
    augmenting = [
        [type(layer).__name__ for layer in model.layers if "Random" in type(layer).__name__] for model in built
    ]
    assert augmenting == [["RandomTranslation", "RandomRotation"], []]
    assert kept[0]["augmentation"] == "RandomTranslation, RandomRotation"
    assert removed[0]["augmentation"] == "removed (RandomTranslation, RandomRotation)"
    assert spec["augmentation"]  # the caller's entry is left as it was


@pytest.mark.slow
def test_profile_times_every_convolution_of_an_epoch(tiny_data, ladder_specs, tmp_path):
    """profile_step.py: oneDNN's primitive lines of one epoch, its convolutions' FLOPs counted from their shapes."""
    import profile_step

    spec = tmp_path / "model_10.json"
    spec.write_text(json.dumps({**ladder_specs["model_10"], "batch_size": 50}))
    result = profile_step.main(
        str(tiny_data), str(spec), str(tmp_path / "profile.md"), images=120, threads=1, peak_seconds=0.3
    )
    assert result["images"] == 100  # whole batches only
    by_kind = result["by_kind"].set_index(["kind", "direction"])
    conv = [k for k in by_kind.index if k[0] == "convolution"]
    assert sorted(d for _, d in conv) == ["backward_data", "backward_weights", "forward_training"]
    # The forward convolutions' FLOPs from oneDNN's shapes = the layers' own arithmetic x images.
    model = models.build_model(ladder_specs["model_10"])
    per_image = sum(
        2 * np.prod(layer.kernel.shape) * layer.output.shape[1] * layer.output.shape[2]
        for layer in model.layers
        if isinstance(layer, keras.layers.Conv2D)
    )
    assert by_kind.loc[("convolution", "forward_training"), "flops"] == 100 * per_image
    assert (by_kind.loc[conv, "share"] > 0).all() and result["peaks"]["bfloat16"] > 0
    # TensorFlow's trace of an epoch, by layer: the convolutions and the BatchNormalizations are there.
    by_layer = result["by_layer"].set_index("layer")
    assert by_layer.loc["conv2d", "share"] > 0.2 and by_layer["share"].sum() == pytest.approx(1)
    assert by_layer.loc["batchnormalization", "share"] > 0 and "dropout" in by_layer.index
    text = (tmp_path / "profile.md").read_text()
    assert "## Convolutions, largest first" in text and "## By layer (TensorFlow's trace" in text


def test_benchmark_study_augmentation_matches_the_entry(ladder_specs):
    import benchmark

    augmentation = benchmark.StudyAugmentation(ladder_specs["model_09"])  # translation + rotation
    assert augmentation.width_shift_range == 0.1 and augmentation.height_shift_range == 0.0
    assert augmentation.rotation_range == pytest.approx(0.0417 * 360)  # 15 degrees
    assert not augmentation.horizontal_flip and not benchmark.StudyAugmentation(ladder_specs["model_01"])
    image = np.random.default_rng(0).random((32, 32, 3), dtype=np.float32)
    still = benchmark.StudyAugmentation({"augmentation": [{"RandomRotation": {"factor": 0.0}}]})
    assert np.allclose(still.transform(image, np.random.default_rng(0)), image, atol=1e-6)  # identity
    shifted = benchmark.StudyAugmentation(
        {"augmentation": [{"RandomTranslation": {"height_factor": 0.0, "width_factor": 0.1}}]}
    )
    moved = shifted.transform(image, np.random.default_rng(1))
    assert moved.shape == image.shape and not np.allclose(moved, image)
    batches = augmentation.flow(image[None].repeat(10, 0), np.eye(10, dtype="float32"), batch_size=4)
    assert len(batches) == 3 and batches[2][0].shape == (2, 32, 32, 3)


def test_flops_are_counted_from_the_layers_by_hand_arithmetic():
    from cnnstudy import flops

    model = keras.Sequential(
        [
            keras.Input((8, 8, 3)),
            keras.layers.Conv2D(4, 3, padding="same"),  # 8x8 outputs x 4 filters x (3x3x3) multiply-adds
            keras.layers.BatchNormalization(),  # elementwise: not counted
            keras.layers.MaxPooling2D(),  # -> 4x4x4
            keras.layers.Conv2D(5, 2, padding="valid"),  # 3x3 outputs x 5 filters x (2x2x4)
            keras.layers.Flatten(),
            keras.layers.Dense(10),  # 45 x 10
        ]
    )
    expected = 2 * (8 * 8 * 4 * 3 * 3 * 3 + 3 * 3 * 5 * 2 * 2 * 4 + 45 * 10)
    assert flops.forward_flops(model) == expected
    peak = flops.matmul_peak("float32", size=256, seconds=0.3)
    assert 1e8 < peak < 1e14  # a CPU core does between 0.1 GFLOP/s and 100 TFLOP/s


def test_conv_muon_orthogonalises_conv_steps_and_takes_nesterov_sgd_elsewhere():
    kernel = keras.Variable(np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype("float32"))
    bias = keras.Variable(np.zeros(8, "float32"))
    opt = optimizers.ConvMuon(learning_rate=0.1, momentum=0.5, nesterov=True, muon_scale=2.0, muon_momentum=0.6)
    opt.build([kernel, bias])
    grad_k = np.random.default_rng(1).normal(size=(3, 3, 4, 8)).astype("float32")
    grad_b = np.ones(8, "float32")
    before = kernel.numpy()
    opt.apply([grad_k, grad_b], [kernel, bias])
    # Elsewhere: PyTorch's Nesterov SGD, first step: buffer = g, step = g + 0.5 g.
    assert np.allclose(bias.numpy(), -0.1 * 1.5 * grad_b)
    # Conv kernel: rescaled to norm sqrt(cout), then a step of 0.2 along the orthogonalised momentum.
    normalised = before * np.sqrt(8) / np.linalg.norm(before)
    step = (normalised - kernel.numpy()) / 0.2
    singular = np.linalg.svd(step.reshape(-1, 8), compute_uv=False)
    assert singular.min() > 0.3 and singular.max() < 1.6  # Newton-Schulz: roughly orthogonal (U S' V^T)
    direction = (grad_k + 0.6 * grad_k).reshape(-1, 8)
    assert np.sum(step.reshape(-1, 8) * direction) > 0  # along the gradient's direction


def test_conv_muon_anneals_a_variable_to_zero_then_freezes_it():
    # airbench94_muon's whitening bias: its rate falls from the peak to 0 over its steps (for the
    # step and the weight decay), then nothing moves it; the other variables keep the rate.
    annealed, plain = (
        keras.Variable(np.ones(4, "float32"), name="annealed"),
        keras.Variable(np.ones(4, "float32"), name="plain"),
    )
    opt = optimizers.ConvMuon(
        learning_rate=0.1, momentum=0.5, weight_decay=0.01, annealed={"annealed": 3}, anneal_peak=0.1
    )
    grad = np.ones(4, "float32")
    expected_a, expected_p, buffer_a, buffer_p = 1.0, 1.0, 0.0, 0.0
    for step in range(6):
        opt.apply([grad, grad], [annealed, plain])
        rate = 0.1 * max(0.0, 1 - step / 3)
        buffer_a, buffer_p = 0.5 * buffer_a + 1, 0.5 * buffer_p + 1
        expected_a = expected_a - expected_a * 0.01 * rate - rate * (1 + 0.5 * buffer_a)
        expected_p = expected_p - expected_p * 0.01 * 0.1 - 0.1 * (1 + 0.5 * buffer_p)
        assert np.allclose(annealed.numpy(), expected_a, rtol=1e-5) and np.allclose(
            plain.numpy(), expected_p, rtol=1e-5
        )
        if step == 2:
            frozen = annealed.numpy().copy()
    assert np.array_equal(annealed.numpy(), frozen)  # steps 3, 4, 5: rate 0, no decay, no momentum
    with pytest.raises(ValueError, match="not among the trained ones"):
        optimizers.ConvMuon(learning_rate=0.1, annealed={"elsewhere": 3}, anneal_peak=0.1).build([plain])


def test_bias_anneal_hands_the_whitening_bias_and_its_steps_to_the_optimizer(ladder_specs):
    from cnnstudy.errors import ConfigError

    spec = copy.deepcopy(ladder_specs["model_18"])
    whitening = next(layer["PatchWhitening"] for layer in spec["layers"] if "PatchWhitening" in layer)
    whitening["bias_anneal"] = True
    model = models.compile_model(models.build_model(spec), spec, steps_per_epoch=23)
    bias = next(layer for layer in model.layers if isinstance(layer, layers.PatchWhitening)).bias
    assert (
        model.optimizer.annealed == {bias.path: 3 * 23}
        and model.optimizer.anneal_peak == spec["optimizer"]["learning_rate"]
    )
    spec["optimizer"] = {"name": "sgd", "learning_rate": 0.1}
    with pytest.raises(ConfigError, match="bias_anneal needs the conv_muon optimizer"):
        models.compile_model(models.build_model(spec), spec, steps_per_epoch=23)
    with pytest.raises(ConfigError, match="bias_anneal needs bias_epochs >= 1"):
        layers.PatchWhitening(bias_anneal=True)


def test_model_18_builds_and_trains_an_epoch(tiny_data, ladder_specs, tmp_path):
    from cnnstudy.layers import PatchWhitening

    spec = copy.deepcopy(ladder_specs["model_18"])
    per_epoch = datasets.images_per_epoch(45_000, spec["batch_size"], spec["drop_last"])
    assert spec["optimizer"]["name"] == "conv_muon" and spec["epochs"] * per_epoch <= 400_000
    spec.update(epochs=2, batch_size=100)
    out = _outputs(tmp_path)
    info = train.main(str(tiny_data), spec, **out, state_dir=str(tmp_path / "state"), threads=2)
    history = pd.read_csv(out["history_out"])
    assert history["epoch"].tolist() == [1, 2] and np.isfinite(history["loss"]).all()
    assert history["test_accuracy"].between(0, 1).all() and info["epochs_run"] == 2
    model = keras.saving.load_model(out["model_out"])
    whitening = next(layer for layer in model.layers if isinstance(layer, PatchWhitening))
    assert whitening.bias_epochs == 3 and float(whitening.bias_on.numpy()) == 1.0  # still training its bias
