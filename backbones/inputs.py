"""The backbone input contract in TensorFlow: encoded or decoded images -> ``[N, S, S, 3]`` in [0, 1].

:func:`image_to_backbone_input` is the one definition of "decoded image -> backbone input" in
TensorFlow, used by the exported serving model and image-mode training. The preprocessing job
frames with Pillow instead (``pipeline.images.backbone_pixels``, a third of the CPU, within about
1/255 of this function — a test holds it there) and scales with :func:`pixels_to_backbone_input`.
How an image is framed (squashed, or its centre cropped) is the dataset's ``--crop_fraction``,
which the manifest records (``Manifest.crop_fraction()``).
"""

from __future__ import annotations

import tensorflow as tf

from schemas.backbones import CROP_SQUASH, VALUE_RANGE, crop_box


def image_to_backbone_input(
    images: tf.Tensor, image_size: int, crop_fraction: float = CROP_SQUASH
) -> tf.Tensor:
    """Converts decoded uint8 RGB images ``[N, H, W, 3]`` (or one ``[H, W, 3]``) to backbone input.

    Scales to float32 ``[0, 1]`` and resizes (bilinear, antialiased): with ``crop_fraction`` 0
    straight to ``image_size x image_size``, as TF-Hub's retraining examples do; with a fraction
    F, keeping the aspect ratio so that the shorter side is ``image_size / F``, then takes the
    centred square (:func:`schemas.backbones.crop_box`, on tensors here).
    """
    images = tf.image.convert_image_dtype(images, tf.float32)
    if crop_fraction == CROP_SQUASH:
        resized = tf.image.resize(
            images, [image_size, image_size], method="bilinear", antialias=True
        )
    else:
        shape = tf.shape(images)
        height, width = tf.cast(shape[-3], tf.int64), tf.cast(shape[-2], tf.int64)
        scaled_w, scaled_h, left, top = crop_box(
            width, height, image_size, crop_fraction, minimum=tf.minimum
        )
        # The op behind resize(antialias=True), asked for the crop's square only: the pixels
        # of scaling the whole image and cropping (within 1e-4), without materialising the
        # scaled image (for a 100:1 panorama that would be 30,000 x 297 floats).
        batch = images if images.shape.rank == 4 else images[tf.newaxis]
        resized = tf.raw_ops.ScaleAndTranslate(
            images=batch,
            size=[image_size, image_size],
            scale=tf.cast(tf.stack([scaled_h, scaled_w]), tf.float32)
            / tf.cast(tf.stack([height, width]), tf.float32),
            translation=-tf.cast(tf.stack([top, left]), tf.float32),
            kernel_type="triangle",
            antialias=True,
        )
        resized = resized if images.shape.rank == 4 else resized[0]
    return tf.clip_by_value(resized, VALUE_RANGE[0], VALUE_RANGE[1])


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


def decode_to_backbone_input(
    encoded: tf.Tensor, image_size: int, crop_fraction: float = CROP_SQUASH
) -> tf.Tensor:
    """Decodes a batch of encoded images (JPEG, PNG, GIF, BMP bytes, shape [N]) to backbone input."""
    return tf.map_fn(
        lambda data: image_to_backbone_input(decode_image(data), image_size, crop_fraction),
        encoded,
        fn_output_signature=tf.TensorSpec([image_size, image_size, 3], tf.float32),
        parallel_iterations=16,
    )
