"""Keras objects the builder needs and Keras lacks, registered so saved models load again.

airbench's pieces (model_17): PatchWhitening, Bias (a bias with its own learning-rate
multiplier), the Dirac conv initialiser; and BackbonePreprocess, a keras.applications
backbone's own input scaling inside the model. Import this module (cnnstudy.models does)
before loading a saved model.
"""

from __future__ import annotations

import math

import keras
import numpy as np

from .errors import ConfigError


@keras.saving.register_keras_serializable(package="cnnstudy")
class PatchWhitening(keras.layers.Layer):
    """airbench's first layer: a frozen 'valid' convolution that whitens image patches.

    Its 2 * k * k * channels filters are the eigenvectors of the training images' k x k patch
    covariance, scaled by 1 / sqrt(eigenvalue + epsilon), and their negatives (so that a
    following ReLU/GELU keeps both signs). ``adapt(images)`` computes them from the data,
    as a Keras Normalization layer adapts. The bias starts at minus the filters' response to
    the mean patch, so the outputs start centred (airbench normalises its inputs first); it
    stays trainable. Options of airbench94_muon: ``bias_lr_multiplier`` (the bias learns that
    many times faster, by the reparametrisation of ``Bias``), ``bias_epochs`` (the bias trains
    for the first epochs only; training.EpochSeeds' sibling ``FreezeWhiteningBias`` sets it) and
    ``bias_anneal`` (over those epochs the bias's rate falls linearly from the peak to 0, its
    own schedule, and nothing moves it after: no momentum, no weight decay; ConvMuon does it).
    """

    def __init__(
        self,
        kernel_size: int = 2,
        epsilon: float = 5e-4,
        samples: int = 5000,
        bias_lr_multiplier: float = 1.0,
        bias_epochs: int | None = None,
        bias_anneal: bool = False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.kernel_size, self.epsilon, self.samples = int(kernel_size), float(epsilon), int(samples)
        self.bias_lr_multiplier, self.bias_epochs, self.bias_anneal = (
            float(bias_lr_multiplier),
            bias_epochs,
            bool(bias_anneal),
        )
        if self.bias_anneal and not bias_epochs:
            raise ConfigError(
                "PatchWhitening: bias_anneal needs bias_epochs >= 1, the epochs over which the rate falls to 0"
            )

    def build(self, input_shape):
        k, channels = self.kernel_size, input_shape[-1]
        self.kernel = self.add_weight(
            shape=(k, k, channels, 2 * k * k * channels), initializer="zeros", trainable=False, name="kernel"
        )
        self.bias = self.add_weight(shape=(2 * k * k * channels,), initializer="zeros", name="bias")
        if self.bias_epochs is not None:  # 1 while the bias trains, 0 after (a variable: checkpoints keep it)
            self.bias_on = self.add_weight(shape=(), initializer="ones", trainable=False, name="bias_on")

    def adapt(self, images: np.ndarray) -> None:
        """Set the filters from (up to ``samples``) training images, NHWC in [0, 1]."""
        k = self.kernel_size
        images = np.asarray(images[: self.samples], dtype=np.float64)
        patches = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(1, 2))  # N,H',W',C,k,k
        patches = patches.transpose(0, 1, 2, 4, 5, 3).reshape(-1, k * k * images.shape[-1])  # (kh, kw, c) order
        eigenvalues, eigenvectors = np.linalg.eigh(np.cov(patches, rowvar=False))
        filters = eigenvectors / np.sqrt(eigenvalues + self.epsilon)  # one filter per column
        filters = np.concatenate([filters, -filters], axis=1)
        self.kernel.assign(filters.reshape(self.kernel.shape).astype("float32"))
        self.bias.assign((-patches.mean(axis=0) @ filters / math.sqrt(self.bias_lr_multiplier)).astype("float32"))

    def call(self, images):
        kernel = keras.ops.cast(self.kernel, images.dtype)
        bias = self.bias
        if self.bias_lr_multiplier != 1.0:
            bias = bias * math.sqrt(self.bias_lr_multiplier)
        if self.bias_epochs is not None:
            bias = self.bias_on * bias + (1.0 - self.bias_on) * keras.ops.stop_gradient(bias)
        return keras.ops.conv(images, kernel, padding="valid") + keras.ops.cast(bias, images.dtype)

    def compute_output_shape(self, input_shape):
        k = self.kernel_size
        return (input_shape[0], input_shape[1] - k + 1, input_shape[2] - k + 1, 2 * k * k * input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "kernel_size": self.kernel_size,
            "epsilon": self.epsilon,
            "samples": self.samples,
            "bias_lr_multiplier": self.bias_lr_multiplier,
            "bias_epochs": self.bias_epochs,
            "bias_anneal": self.bias_anneal,
        }


@keras.saving.register_keras_serializable(package="cnnstudy")
class Bias(keras.layers.Layer):
    """Adds a per-channel bias that learns ``lr_multiplier`` times faster than the other weights.

    Keras optimizers have one learning rate for all variables; airbench trains BatchNorm
    biases 64x faster. The variable holds bias / sqrt(m) and the layer adds it times
    sqrt(m): gradient and step both scale by sqrt(m), so the bias moves m times as far
    under (momentum) SGD, while decoupled weight decay shrinks it at the usual rate.
    Use it after BatchNormalization(center=False).
    """

    def __init__(self, lr_multiplier: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.lr_multiplier = float(lr_multiplier)

    def build(self, input_shape):
        self.bias = self.add_weight(shape=(input_shape[-1],), initializer="zeros", name="bias")

    def call(self, inputs):
        return inputs + keras.ops.cast(self.bias * math.sqrt(self.lr_multiplier), inputs.dtype)

    def get_config(self):
        return {**super().get_config(), "lr_multiplier": self.lr_multiplier}


@keras.saving.register_keras_serializable(package="cnnstudy")
class Dirac(keras.initializers.RandomUniform):
    """airbench's conv initialisation: PyTorch's default uniform(+-1/sqrt(fan_in)) kernel whose
    first min(in, out) filters are the identity (filter i passes input channel i through),
    so each conv starts as an implicit residual connection.
    """

    def __init__(self, seed=None):
        super().__init__(minval=-1.0, maxval=1.0, seed=seed)

    def __call__(self, shape, dtype=None):
        kh, kw, cin, cout = shape
        kernel = super().__call__(shape, dtype) / math.sqrt(kh * kw * cin)
        n = min(cin, cout)
        identity, keep = np.zeros(shape, "float32"), np.ones(shape, "float32")
        identity[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
        keep[..., :n] = 0.0
        return kernel * keras.ops.cast(keep, kernel.dtype) + keras.ops.cast(identity, kernel.dtype)

    def get_config(self):
        return {"seed": super().get_config()["seed"]}


def backbone_constructor(name: str):
    ctor = getattr(keras.applications, name, None)
    if not callable(ctor):  # keras.applications' public callables are exactly its model constructors
        raise ConfigError(f"backbone {name!r} is not a keras.applications model (e.g. VGG16, ResNet50, InceptionV3)")
    return ctor


def preprocess_function(name: str):
    """The backbone's own ``preprocess_input`` (from its keras.applications module)."""
    module = backbone_constructor(name).__module__.rsplit(".", 1)[-1]
    return getattr(keras.applications, module).preprocess_input


@keras.saving.register_keras_serializable(package="cnnstudy")
class BackbonePreprocess(keras.layers.Layer):
    """Scales our [0, 1] images the way ``backbone`` was trained (its preprocess_input on 0-255).

    Runs in float32 (set by the builder) so the mean subtraction is exact under mixed precision.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        self.backbone = backbone
        self._preprocess = preprocess_function(backbone)

    def call(self, images):
        return self._preprocess(images * 255.0)

    def get_config(self):
        return {**super().get_config(), "backbone": self.backbone}


# ---- augmentation that XLA compiles on JAX ------------------------------------------------------------
# Keras 3.15 sets supports_jit = False in RandomTranslation and RandomRotation on every backend,
# because TensorFlow's ImageProjectiveTransformV3 cannot be compiled; a model holding one then
# trains its whole step without XLA, and on JAX an uncompiled step runs op by op. On JAX the
# transform is jax.scipy's map_coordinates (keras.src.backend.jax.image.affine_transform), which XLA
# compiles. These subclasses say so on JAX and change nothing else; TensorFlow jobs keep Keras' own
# classes (models.augmentation_class), so their numerics and saved models are as before.


def _compiled_on_jax(cls):
    def __init__(self, **kwargs):
        cls.__init__(self, **kwargs)
        self.supports_jit = keras.backend.backend() == "jax"

    name = f"Compiled{cls.__name__}"
    subclass = type(name, (cls,), {"__init__": __init__, "__doc__": f"Keras' {cls.__name__}, compiled by XLA on JAX."})
    return keras.saving.register_keras_serializable(package="cnnstudy", name=name)(subclass)


COMPILED_ON_JAX = {
    cls.__name__: _compiled_on_jax(cls) for cls in (keras.layers.RandomTranslation, keras.layers.RandomRotation)
}

# Names an entry may use beyond keras.layers / Keras' initialisers.
CUSTOM_LAYERS = {"PatchWhitening": PatchWhitening, "Bias": Bias}
CUSTOM_INITIALIZERS = {"dirac": Dirac}
