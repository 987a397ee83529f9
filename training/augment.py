"""Training-only image augmentation for `tf.data` pipelines.

This module owns the random transforms applied to training batches: random crop, horizontal flip,
rotation, zoom, brightness and contrast. Evaluation, test and serving never augment, so nothing
here is part of the model or the export; the data module maps :func:`make_augmenter` over the
training split only.

Every transform has its own switch because augmentation must not destroy what the label depends
on: switch off flips for text and digits (a mirrored "2" is not a "2"), switch off brightness and
contrast jitter where colour or lightness is the class, and keep rotation small (or off) where
orientation matters.

Decisions:
  * Built on stateless TF ops (``tf.image.stateless_*``, ``tf.random.stateless_uniform`` and the
    ``ImageProjectiveTransformV3`` op that tf_keras' ``RandomRotation``/``RandomZoom`` use), so a
    seed fully determines the result and nothing creates variables inside ``Dataset.map``.
  * Rotation and zoom are composed into one affine transform per image and resampled once
    (bilinear, ``reflect`` fill as in tf_keras), so enabling both blurs no more than one.
  * Each enabled transform draws its own random values per image, from its own sub-seed: turning
    one transform off does not change what the others do.
  * Brightness adds the same delta to all channels of an image; contrast scales each channel
    around its own mean (as ``tf.image.adjust_contrast``). Values are clipped to [0, 1] once, at
    the end.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import tensorflow as tf

from training.config import TrainConfig

# Sub-seed slots, one per transform (see `_augment`).
_CROP, _FLIP, _ROTATION, _ZOOM, _BRIGHTNESS, _CONTRAST = range(6)
_NUM_SEEDS = 6
_INT64_MAX = 2**63 - 1


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Which random transforms to apply to training images, and how strongly.

    Every transform is switchable so that augmentation never removes what the label depends on:
    no flips for text or digits, no colour jitter where colour is the class, no rotation where
    orientation is informative.

    Attributes:
        crop: Random crop of the original size from the image resized up by ``crop_scale``.
        flip: Random horizontal flip (probability 0.5).
        brightness: Maximum brightness delta added to an image in [0, 1]; 0 disables.
        contrast: Contrast factor drawn from ``[1 - contrast, 1 + contrast]``; 0 disables.
        rotation: Maximum rotation as a fraction of a full turn (2*pi), as in tf_keras
            ``RandomRotation``; 0 disables.
        zoom: Maximum zoom fraction: the sampled area is scaled by a factor in
            ``[1 - zoom, 1 + zoom]`` (in and out, as tf_keras ``RandomZoom``); 0 disables.
        crop_scale: How much larger than the model size the image is resized before cropping.
    """

    crop: bool = True
    flip: bool = True
    brightness: float = 0.1
    contrast: float = 0.1
    rotation: float = 0.05
    zoom: float = 0.1
    crop_scale: float = 1.15

    def __post_init__(self) -> None:
        if not 0.0 <= self.brightness <= 1.0:
            raise ValueError(
                f"brightness must be in [0, 1] (a delta on images in [0, 1]), got {self.brightness}"
            )
        if not 0.0 <= self.contrast < 1.0:
            raise ValueError(f"contrast must be in [0, 1) (0 disables it), got {self.contrast}")
        if not 0.0 <= self.rotation <= 0.5:
            raise ValueError(
                f"rotation is a fraction of a full turn and must be in [0, 0.5], got {self.rotation}"
            )
        if not 0.0 <= self.zoom < 1.0:
            raise ValueError(f"zoom must be in [0, 1) (0 disables it), got {self.zoom}")
        if not self.crop_scale >= 1.0:
            raise ValueError(
                f"crop_scale must be >= 1 (the crop is taken from an enlarged image), "
                f"got {self.crop_scale}"
            )


def augment_images(images: tf.Tensor, config: AugmentConfig, seed: int | None = None) -> tf.Tensor:
    """Randomly augments a batch of images, each image independently.

    Args:
        images: float32 ``[B, H, W, C]`` (or one image ``[H, W, C]``) in [0, 1], already resized to
            the model size; ``C`` may be 1 or 3.
        config: Which transforms to apply.
        seed: With an int, the result is a pure function of ``images`` and ``seed`` (the same
            call gives the same output, eagerly or in a graph). With None, a fresh random seed
            is drawn on every call.

    Returns:
        A tensor of the same shape and dtype, clipped to [0, 1].
    """
    if seed is None:
        seed_pair = tf.random.uniform([2], maxval=_INT64_MAX, dtype=tf.int64)
    else:
        seed_pair = tf.constant([seed, 0], dtype=tf.int64)
    return _augment(images, config, seed_pair)


def make_augmenter(
    config: AugmentConfig, seed: int | None = None
) -> Callable[[tf.Tensor], tf.Tensor]:
    """Returns ``fn(images) -> images`` for ``Dataset.map``, drawing new randomness per call.

    The random state (one ``tf.random.Generator``) is created here, once, outside the dataset
    function; each call of the returned function advances it, so every batch and every epoch is
    augmented differently. With a seed, the sequence of augmentations is reproducible as long as
    the map runs sequentially (parallel calls take seeds in a nondeterministic order).

    Args:
        config: Which transforms to apply.
        seed: Seeds the generator; None seeds it from the OS.

    Returns:
        A function taking and returning float32 ``[B, H, W, C]`` (or ``[H, W, C]``) in [0, 1].
    """
    if seed is None:
        generator = tf.random.Generator.from_non_deterministic_state()
    else:
        generator = tf.random.Generator.from_seed(seed)

    def augment(images: tf.Tensor) -> tf.Tensor:
        seed_pair = generator.make_seeds(1)[:, 0]
        return _augment(images, config, seed_pair)

    return augment


def _augment(images: tf.Tensor, config: AugmentConfig, seed_pair: tf.Tensor) -> tf.Tensor:
    """Applies the enabled transforms with sub-seeds split from ``seed_pair`` (shape [2])."""
    images = tf.convert_to_tensor(images)
    if images.dtype != tf.float32:
        raise ValueError(f"augment expects float32 images in [0, 1], got {images.dtype.name}")
    if images.shape.rank == 3:
        return _augment(images[tf.newaxis], config, seed_pair)[0]
    if images.shape.rank != 4:
        raise ValueError(f"augment expects [B, H, W, C] or [H, W, C] images, got {images.shape}")

    static_shape = images.shape
    seeds = tf.random.experimental.stateless_split(seed_pair, num=_NUM_SEEDS)
    batch = tf.shape(images)[0]

    if config.crop and config.crop_scale > 1.0:
        images = _random_crop(images, config.crop_scale, seeds[_CROP])
    if config.flip:
        images = tf.image.stateless_random_flip_left_right(images, seed=seeds[_FLIP])
    if config.rotation > 0 or config.zoom > 0:
        angles = tf.zeros([batch])
        zooms = tf.ones([batch])
        if config.rotation > 0:
            max_angle = config.rotation * 2.0 * math.pi
            angles = tf.random.stateless_uniform(
                [batch], seeds[_ROTATION], minval=-max_angle, maxval=max_angle
            )
        if config.zoom > 0:
            zooms = tf.random.stateless_uniform(
                [batch], seeds[_ZOOM], minval=1.0 - config.zoom, maxval=1.0 + config.zoom
            )
        images = _rotate_and_zoom(images, angles, zooms)
    if config.brightness > 0:
        deltas = tf.random.stateless_uniform(
            [batch, 1, 1, 1], seeds[_BRIGHTNESS], -config.brightness, config.brightness
        )
        images = images + deltas
    if config.contrast > 0:
        factors = tf.random.stateless_uniform(
            [batch, 1, 1, 1], seeds[_CONTRAST], 1.0 - config.contrast, 1.0 + config.contrast
        )
        means = tf.reduce_mean(images, axis=[1, 2], keepdims=True)
        images = (images - means) * factors + means

    images = tf.clip_by_value(images, 0.0, 1.0)
    images.set_shape(static_shape)
    return images


def _random_crop(images: tf.Tensor, scale: float, seed: tf.Tensor) -> tf.Tensor:
    """Resizes ``[B, H, W, C]`` up by ``scale`` and crops a random H x W window per image."""
    shape = tf.shape(images)
    batch, height, width = shape[0], shape[1], shape[2]
    big_height = tf.cast(tf.round(tf.cast(height, tf.float32) * scale), tf.int32)
    big_width = tf.cast(tf.round(tf.cast(width, tf.float32) * scale), tf.int32)
    enlarged = tf.image.resize(images, tf.stack([big_height, big_width]), method="bilinear")

    seed_y, seed_x = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    top = tf.random.stateless_uniform(
        [batch], seed_y, minval=0, maxval=big_height - height + 1, dtype=tf.int32
    )
    left = tf.random.stateless_uniform(
        [batch], seed_x, minval=0, maxval=big_width - width + 1, dtype=tf.int32
    )
    rows = top[:, tf.newaxis] + tf.range(height)[tf.newaxis, :]  # [B, H]
    cols = left[:, tf.newaxis] + tf.range(width)[tf.newaxis, :]  # [B, W]
    cropped = tf.gather(enlarged, rows, axis=1, batch_dims=1)  # [B, H, big_W, C]
    return tf.gather(cropped, cols, axis=2, batch_dims=1)  # [B, H, W, C]


def _rotate_and_zoom(images: tf.Tensor, angles: tf.Tensor, zooms: tf.Tensor) -> tf.Tensor:
    """Rotates each image by ``angles`` (radians) and scales it by ``zooms`` about its centre.

    A zoom factor above 1 samples a larger area (zooms out), below 1 zooms in, as tf_keras
    ``RandomZoom``; pixels sampled outside the image are filled by reflection.
    """
    shape = tf.shape(images)
    height = tf.cast(shape[1], tf.float32)
    width = tf.cast(shape[2], tf.float32)
    centre_x = (width - 1.0) / 2.0
    centre_y = (height - 1.0) / 2.0
    # Output pixel p samples input point c + zoom * R(angle) (p - c).
    cos = tf.cos(angles) * zooms
    sin = tf.sin(angles) * zooms
    transforms = tf.stack(
        [
            cos,
            -sin,
            centre_x - (cos * centre_x - sin * centre_y),
            sin,
            cos,
            centre_y - (sin * centre_x + cos * centre_y),
            tf.zeros_like(angles),
            tf.zeros_like(angles),
        ],
        axis=1,
    )
    return tf.raw_ops.ImageProjectiveTransformV3(
        images=images,
        transforms=transforms,
        output_shape=shape[1:3],
        fill_value=0.0,
        interpolation="BILINEAR",
        fill_mode="REFLECT",
    )


def augment_config(config: TrainConfig) -> AugmentConfig:
    """The trainer's ``--crop/--flip/--brightness/...`` switches as an :class:`AugmentConfig`.

    A switch that is off sets its strength to 0; one that is on keeps the default strength.
    """
    defaults = AugmentConfig()
    return AugmentConfig(
        crop=config.crop,
        flip=config.flip,
        brightness=defaults.brightness if config.brightness else 0.0,
        contrast=defaults.contrast if config.contrast else 0.0,
        rotation=defaults.rotation if config.rotation else 0.0,
        zoom=defaults.zoom if config.zoom else 0.0,
    )


def trainer_augmenter(config: TrainConfig) -> Callable[[tf.Tensor], tf.Tensor] | None:
    """The training-batch augmenter for ``--augment`` (seeded by ``--seed``), or None without it."""
    if not config.augment:
        return None
    return make_augmenter(augment_config(config), seed=config.seed)
