"""The backbone input contract in TensorFlow: encoded or decoded images -> ``[N, S, S, 3]`` in [0, 1].

:func:`image_to_backbone_input` is the one definition of "decoded image -> backbone input" in
TensorFlow, used by the exported serving model and image-mode training. The preprocessing job
resizes with Pillow instead (``pipeline.images.backbone_pixels``, a third of the CPU, within about
1/255 of this function — a test holds it there) and scales with :func:`pixels_to_backbone_input`.
"""

from __future__ import annotations

import tensorflow as tf

from schemas.backbones import VALUE_RANGE


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
