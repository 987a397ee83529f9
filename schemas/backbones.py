"""Registry of feature-vector backbones and the input contract each one owns.

A backbone is a TF-Hub-format feature-vector model: it takes float32 RGB images of shape
``[N, size, size, 3]`` with values in ``[0, 1]`` and returns ``[N, D]`` features. Presets map a
short name to a Hub handle and its input size; any other Hub handle or local SavedModel path is
accepted too, with its size read from the model's signature (or given explicitly).

:func:`image_to_backbone_input` is the one definition of "decoded image -> backbone input" in
TensorFlow, used by the exported serving model and image-mode training. The preprocessing job
resizes with Pillow instead (``pipeline.images.backbone_pixels``, a third of the CPU, within about
1/255 of this function — a test holds it there) and scales with :func:`pixels_to_backbone_input`.
"""

from __future__ import annotations

import dataclasses

import tensorflow as tf

# TF-Hub image modules expect RGB in [0, 1]; normalisation specific to a network lives inside it.
VALUE_RANGE = (0.0, 1.0)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A backbone and its input contract.

    Attributes:
      name: preset name, or the handle itself for non-preset backbones.
      handle: TF-Hub / Kaggle URL or a local SavedModel directory.
      image_size: square input side in pixels.
      embedding_dim: feature-vector length, or None until the model has been probed.
      value_range: range of the float input values.
    """

    name: str
    handle: str
    image_size: int
    embedding_dim: int | None = None
    value_range: tuple[float, float] = VALUE_RANGE

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "handle": self.handle,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "value_range": list(self.value_range),
        }

    @classmethod
    def from_json(cls, data: dict) -> BackboneSpec:
        return cls(
            name=data["name"],
            handle=data["handle"],
            image_size=int(data["image_size"]),
            embedding_dim=data.get("embedding_dim"),
            value_range=tuple(data.get("value_range", VALUE_RANGE)),
        )


# Built-in backbones are built locally (no network) into the hubflow cache on first use; their
# handle names the recipe, and each machine resolves it to its own cache path.
BUILTIN_SCHEME = "hubflow-builtin://"
DEFAULT_BACKBONE = "efficientnet_lite0"

PRESETS: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "efficientnet_lite0",
            f"{BUILTIN_SCHEME}efficientnet_lite0",
            224,
            1280,
        ),
        BackboneSpec(
            "mobilenet_v2_100_224",
            "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
            224,
            1280,
        ),
        BackboneSpec(
            "efficientnet_v2_b0",
            "https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet1k_b0/feature_vector/2",
            224,
            1280,
        ),
        BackboneSpec(
            "inception_v3",
            "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5",
            299,
            2048,
        ),
        BackboneSpec(
            "resnet_50_v2",
            "https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5",
            224,
            2048,
        ),
    )
}


def is_builtin(handle: str) -> bool:
    """True for a built-in backbone's handle (``hubflow-builtin://<name>``)."""
    return handle.startswith(BUILTIN_SCHEME)


def is_handle(value: str) -> bool:
    """True when ``value`` looks like a Hub/Kaggle URL or a filesystem path, not a preset name."""
    return "/" in value or "\\" in value or value.startswith(".")


def image_to_backbone_input(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Converts decoded uint8 RGB images ``[N, H, W, 3]`` (or one ``[H, W, 3]``) to backbone input.

    Scales to float32 ``[0, 1]`` and resizes (bilinear, antialiased) straight to
    ``image_size x image_size``, as TF-Hub image modules expect.
    """
    images = tf.image.convert_image_dtype(images, tf.float32)
    images = tf.image.resize(images, [image_size, image_size], method="bilinear", antialias=True)
    return tf.clip_by_value(images, VALUE_RANGE[0], VALUE_RANGE[1])


def pixels_to_backbone_input(pixels: tf.Tensor) -> tf.Tensor:
    """uint8 RGB images already at the backbone's size ``[N, S, S, 3]`` -> float32 in ``[0, 1]``.

    The preprocessing job resizes with Pillow (``pipeline.images.backbone_pixels``, within
    about 1/255 of :func:`image_to_backbone_input`) and feeds the model through this.
    """
    return tf.image.convert_image_dtype(pixels, tf.float32)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes one encoded image (JPEG, PNG, GIF first frame, BMP) to uint8 RGB ``[H, W, 3]``."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    return image


def decode_to_backbone_input(encoded: tf.Tensor, image_size: int) -> tf.Tensor:
    """Decodes a batch of encoded images (JPEG, PNG, GIF, BMP bytes, shape [N]) to backbone input."""
    return tf.map_fn(
        lambda data: image_to_backbone_input(decode_image(data), image_size),
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        parallel_iterations=16,
    )
