"""Training augmentation: each transform alone, all together, seeds, and use in tf.data."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import tensorflow as tf
from tf_keras.src.layers.preprocessing import image_preprocessing as keras_image

from training.augment import (
    AugmentConfig,
    _rotate_and_zoom,
    augment_images,
    make_augmenter,
)

SIZE = 24
OFF = AugmentConfig(crop=False, flip=False, brightness=0.0, contrast=0.0, rotation=0.0, zoom=0.0)


def only(**changes) -> AugmentConfig:
    return dataclasses.replace(OFF, **changes)


def images(batch=8, channels=3, low=0.2, high=0.8, seed=0) -> np.ndarray:
    """Random mid-range images: no transform below pushes them past [0, 1] before clipping."""
    rng = np.random.default_rng(seed)
    return rng.uniform(low, high, (batch, SIZE, SIZE, channels)).astype(np.float32)


def test_everything_off_is_the_identity():
    x = images(channels=3, low=0.0, high=1.0)
    np.testing.assert_array_equal(augment_images(x, OFF, seed=1).numpy(), x)
    np.testing.assert_array_equal(make_augmenter(OFF, seed=1)(tf.constant(x)).numpy(), x)


def test_flip_only_mirrors_some_images_and_keeps_others():
    x = images(batch=64)
    y = augment_images(x, only(flip=True), seed=3).numpy()
    kept = [np.array_equal(out, image) for out, image in zip(y, x, strict=True)]
    mirrored = [np.array_equal(out, image[:, ::-1]) for out, image in zip(y, x, strict=True)]
    assert all(k or m for k, m in zip(kept, mirrored, strict=True))
    assert any(kept) and any(mirrored)


@pytest.mark.parametrize("channels", [1, 3])
def test_brightness_only_shifts_each_image_by_its_own_delta(channels):
    delta = 0.1
    x = images(batch=32, channels=channels)
    y = augment_images(x, only(brightness=delta), seed=4).numpy()
    shift = y - x
    per_image = shift.reshape(len(x), -1)
    # One delta per image, the same for every pixel and channel, within +-delta.
    np.testing.assert_allclose(per_image, per_image[:, :1].repeat(per_image.shape[1], 1), atol=1e-6)
    mean_change = y.mean(axis=(1, 2, 3)) - x.mean(axis=(1, 2, 3))
    assert np.all(np.abs(mean_change) <= delta + 1e-6)
    assert np.std(mean_change) > delta / 10  # independent per image, not one shift for the batch
    assert (mean_change > 0).any() and (mean_change < 0).any()


@pytest.mark.parametrize("channels", [1, 3])
def test_contrast_only_keeps_the_mean_and_scales_the_spread(channels):
    amount = 0.3
    x = images(batch=32, channels=channels, low=0.3, high=0.7)
    y = augment_images(x, only(contrast=amount), seed=5).numpy()
    np.testing.assert_allclose(y.mean(axis=(1, 2)), x.mean(axis=(1, 2)), atol=1e-5)
    ratio = y.std(axis=(1, 2, 3)) / x.std(axis=(1, 2, 3))
    assert np.all((ratio >= 1 - amount - 1e-4) & (ratio <= 1 + amount + 1e-4))
    assert ratio.min() < 0.95 and ratio.max() > 1.05  # factors differ per image


def _window_offsets(out: np.ndarray, enlarged: np.ndarray) -> list[tuple[int, int]]:
    """Offsets (top, left) at which ``out`` is an exact window of ``enlarged``."""
    big = enlarged.shape[0]
    return [
        (top, left)
        for top in range(big - SIZE + 1)
        for left in range(big - SIZE + 1)
        if np.allclose(enlarged[top : top + SIZE, left : left + SIZE], out, atol=1e-6)
    ]


def test_crop_only_is_a_random_window_of_the_enlarged_image():
    config = only(crop=True)
    x = images(batch=16)
    y = augment_images(x, config, seed=6).numpy()
    big = round(SIZE * config.crop_scale)
    enlarged = tf.image.resize(x, [big, big], method="bilinear").numpy()
    offsets = [_window_offsets(out, image) for out, image in zip(y, enlarged, strict=True)]
    assert all(len(found) == 1 for found in offsets), offsets
    assert len({found[0] for found in offsets}) > 4  # each image gets its own window


@pytest.mark.parametrize(
    "config",
    [only(rotation=0.05), only(zoom=0.1), only(crop=True), AugmentConfig()],
    ids=["rotation", "zoom", "crop", "all"],
)
@pytest.mark.parametrize("channels", [1, 3])
def test_geometric_transforms_change_images_keep_shape_and_range(config, channels):
    x = images(batch=8, channels=channels, low=0.0, high=1.0)
    y = augment_images(x, config, seed=7).numpy()
    assert y.shape == x.shape and y.dtype == np.float32
    assert y.min() >= 0.0 and y.max() <= 1.0
    changed = np.abs(y - x).reshape(len(x), -1).max(axis=1) > 1e-3
    assert changed.all()


def test_colour_jitter_output_is_clipped_to_unit_range():
    x = images(batch=16, low=0.0, high=1.0)
    y = augment_images(x, only(brightness=0.5, contrast=0.5), seed=8).numpy()
    assert y.min() == 0.0 and y.max() == 1.0  # values were pushed out and clipped


def test_rotation_matches_tf_keras_random_rotation_geometry():
    x = tf.constant(images(batch=3, low=0.0, high=1.0))
    angles = tf.constant([0.3, -0.2, 1.0])
    ours = _rotate_and_zoom(x, angles, tf.ones([3]))
    keras = keras_image.transform(
        x, keras_image.get_rotation_matrix(angles, SIZE, SIZE), fill_mode="reflect"
    )
    np.testing.assert_allclose(ours.numpy(), keras.numpy(), atol=1e-5)


def test_zoom_matches_tf_keras_random_zoom_geometry():
    x = tf.constant(images(batch=3, low=0.0, high=1.0))
    zooms = tf.constant([0.9, 1.1, 1.0])
    ours = _rotate_and_zoom(x, tf.zeros([3]), zooms)
    keras = keras_image.transform(
        x, keras_image.get_zoom_matrix(tf.stack([zooms, zooms], 1), SIZE, SIZE), fill_mode="reflect"
    )
    np.testing.assert_allclose(ours.numpy(), keras.numpy(), atol=1e-5)


def test_rotation_and_zoom_compose_into_one_resample():
    x = images(batch=2, low=0.0, high=1.0)
    # A half turn is an exact pixel permutation, so zooming the rotated image is the reference.
    both = _rotate_and_zoom(tf.constant(x), tf.constant([math.pi] * 2), tf.constant([0.8, 1.2]))
    rotated = np.ascontiguousarray(x[:, ::-1, ::-1])
    np.testing.assert_allclose(
        _rotate_and_zoom(tf.constant(x), tf.constant([math.pi] * 2), tf.ones([2])).numpy(),
        rotated,
        atol=1e-5,
    )
    zoomed = _rotate_and_zoom(tf.constant(rotated), tf.zeros([2]), tf.constant([0.8, 1.2]))
    np.testing.assert_allclose(both.numpy(), zoomed.numpy(), atol=1e-5)


def _blob_images(batch: int, size: int = 65, offset: int = 10) -> np.ndarray:
    """Grayscale images with one small bright blob ``offset`` pixels right of the centre."""
    yy, xx = np.mgrid[:size, :size]
    centre = (size - 1) / 2
    blob = np.exp(-((yy - centre) ** 2 + (xx - centre - offset) ** 2) / 2.0)
    return np.repeat(blob[None, :, :, None], batch, axis=0).astype(np.float32)


def _blob_polar(y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Angle (radians) and distance of each image's blob centroid from the image centre."""
    size = y.shape[1]
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    weights = y[..., 0] / y[..., 0].sum(axis=(1, 2), keepdims=True)
    cx, cy = (weights * xx).sum(axis=(1, 2)), (weights * yy).sum(axis=(1, 2))
    return np.arctan2(cy, cx), np.hypot(cx, cy)


def test_rotation_is_a_fraction_of_a_full_turn_both_ways():
    y = augment_images(_blob_images(256), only(rotation=0.25), seed=15).numpy()
    angles, distances = _blob_polar(y)
    np.testing.assert_allclose(distances, 10, atol=0.3)  # rotated about the centre
    quarter = math.pi / 2
    assert np.all(np.abs(angles) <= quarter + 0.05)
    assert angles.min() < -0.9 * quarter and angles.max() > 0.9 * quarter


def test_zoom_scales_by_up_to_the_zoom_fraction_in_and_out():
    y = augment_images(_blob_images(256), only(zoom=0.3), seed=16).numpy()
    angles, distances = _blob_polar(y)
    np.testing.assert_allclose(angles, 0, atol=0.02)  # zoomed about the centre
    # A zoom factor z in [0.7, 1.3] samples z times the area: the blob moves to 10 / z.
    assert np.all((distances >= 10 / 1.3 - 0.2) & (distances <= 10 / 0.7 + 0.2))
    assert distances.min() < 10 / 1.25 and distances.max() > 10 / 0.75


def test_every_image_is_augmented_independently():
    x = np.repeat(images(batch=1), 8, axis=0)
    y = augment_images(x, AugmentConfig(), seed=9).numpy()
    for i in range(1, len(y)):
        assert not np.allclose(y[0], y[i], atol=1e-4)


def test_switching_one_transform_off_leaves_the_others_unchanged():
    x = images(batch=16)
    cropped = augment_images(x, only(crop=True), seed=10).numpy()
    cropped_and_flipped = augment_images(x, only(crop=True, flip=True), seed=10).numpy()
    for plain, flipped in zip(cropped, cropped_and_flipped, strict=True):
        assert np.array_equal(plain, flipped) or np.array_equal(plain[:, ::-1], flipped)


def test_a_seed_makes_augment_images_deterministic_eager_and_in_a_graph():
    x = tf.constant(images())
    config = AugmentConfig()
    first = augment_images(x, config, seed=11).numpy()
    np.testing.assert_array_equal(augment_images(x, config, seed=11).numpy(), first)
    in_graph = tf.function(lambda t: augment_images(t, config, seed=11))(x)
    np.testing.assert_allclose(in_graph.numpy(), first, atol=1e-6)
    assert not np.allclose(augment_images(x, config, seed=12).numpy(), first)
    # Without a seed every call differs.
    assert not np.allclose(augment_images(x, config).numpy(), augment_images(x, config).numpy())


def _batches(dataset) -> list[np.ndarray]:
    return [batch.numpy() for batch in dataset]


@pytest.mark.parametrize("channels", [1, 3])
def test_augmenter_runs_in_dataset_map_on_batches(channels):
    x = images(batch=10, channels=channels, low=0.0, high=1.0)
    dataset = tf.data.Dataset.from_tensor_slices(x).batch(4).map(make_augmenter(AugmentConfig()))
    assert dataset.element_spec.shape.as_list() == [None, SIZE, SIZE, channels]
    batches = _batches(dataset)
    assert [len(b) for b in batches] == [4, 4, 2]
    y = np.concatenate(batches)
    assert y.min() >= 0.0 and y.max() <= 1.0
    assert not np.allclose(y, x)


def test_augmenter_differs_per_epoch_and_is_reproducible_with_a_seed():
    x = images(batch=8)

    def dataset(seed):
        return (
            tf.data.Dataset.from_tensor_slices(x)
            .batch(4)
            .map(make_augmenter(AugmentConfig(), seed))
        )

    seeded = dataset(seed=13)
    epoch_1, epoch_2 = _batches(seeded), _batches(seeded)
    assert not np.allclose(epoch_1[0], epoch_2[0])  # new randomness every epoch
    again = dataset(seed=13)
    for a, b in zip(epoch_1 + epoch_2, _batches(again) + _batches(again), strict=True):
        np.testing.assert_array_equal(a, b)
    other = _batches(dataset(seed=14))
    assert not np.allclose(other[0], epoch_1[0])


def test_augmenter_accepts_single_images_before_batching():
    x = images(batch=3)
    dataset = tf.data.Dataset.from_tensor_slices(x).map(make_augmenter(AugmentConfig(), seed=1))
    assert dataset.element_spec.shape.as_list() == [SIZE, SIZE, 3]
    assert len(_batches(dataset)) == 3


def test_non_float_images_are_rejected():
    with pytest.raises(ValueError, match="float32"):
        augment_images(tf.zeros([1, SIZE, SIZE, 3], tf.uint8), AugmentConfig(), seed=1)


@pytest.mark.parametrize(
    "changes",
    [
        {"brightness": -0.1},
        {"contrast": 1.0},
        {"rotation": 0.75},
        {"zoom": -0.2},
        {"crop_scale": 0.9},
    ],
)
def test_config_rejects_values_that_make_no_sense(changes):
    with pytest.raises(ValueError):
        AugmentConfig(**changes)
