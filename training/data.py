"""Input pipelines of the trainer: TFRecords -> parse -> (augment, train only) -> batch -> prefetch.

Image preprocessing is defined once here (and in ``schemas.backbones`` for backbones) and used
both for the datasets and inside the serving export, so training and serving see the same pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from schemas import backbones, csv_format, features
from schemas import manifest as manifest_lib
from training.config import TrainConfig, UsageError

_LOGGER = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


def split_files(data_dir: str, split: str) -> list[str]:
    """The TFRecord shards of one split, sorted."""
    return sorted(tf.io.gfile.glob(f"{data_dir.rstrip('/')}/{features.tfrecord_pattern(split)}"))


def count_records(files: list[str]) -> int:
    """Counts the records of ``files``, naming the file of the first corrupt record.

    Raises:
      UsageError: when a file is unreadable or holds a corrupt record.
    """
    total = 0
    for path in files:
        dataset = tf.data.TFRecordDataset(path, compression_type=features.TFRECORD_COMPRESSION)
        try:
            total += int(dataset.reduce(np.int64(0), lambda n, _: n + 1))
        except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.OpError) as e:
            message = " ".join(str(e.message).split())[:200]
            raise UsageError(f"corrupt TFRecord file {path}: {message}") from None
    return total


def embedding_normalization(data_dir: str, embedding_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean and standard deviation of the embedding, read from the tf.Transform output.

    The transform is an elementwise z-score ``(x - mean) / std``, an affine map per dimension, so
    applying it to 0 and 1 recovers mean and std exactly. The trainer bakes them into a plain
    Keras ``Normalization`` layer: the export then needs no tf.Transform at serving time.
    """
    import tensorflow_transform as tft

    tft_output = tft.TFTransformOutput(data_dir)
    probe = tf.constant(np.stack([np.zeros(embedding_dim), np.ones(embedding_dim)]), tf.float32)
    z = tft_output.transform_raw_features({features.EMBEDDING: probe}, drop_unused_features=True)
    z0, z1 = z[features.EMBEDDING].numpy()
    std = 1.0 / (z1 - z0)
    mean = -z0 * std
    return mean.astype(np.float32), std.astype(np.float32)


def image_preprocessor(
    config: TrainConfig, manifest: manifest_lib.Manifest
) -> tuple[Callable[[tf.Tensor], tf.Tensor], tuple[int, int, int]]:
    """``encoded bytes (scalar) -> float32 image in [0, 1]`` for the model, and its shape."""
    if config.from_scratch:
        size, channels = config.image_size, config.channels

        def scratch(data: tf.Tensor) -> tf.Tensor:
            image = backbones.image_to_backbone_input(backbones.decode_image(data), size)
            return tf.image.rgb_to_grayscale(image) if channels == 1 else image

        return scratch, (size, size, channels)
    size = manifest.backbone.image_size

    def backbone_input(data: tf.Tensor) -> tf.Tensor:
        return backbones.image_to_backbone_input(backbones.decode_image(data), size)

    return backbone_input, (size, size, 3)


def decode_batch(preprocess: Callable, shape: tuple[int, int, int]) -> Callable:
    """Batched version of a per-image preprocessor, for the serving signature."""

    def decode(encoded: tf.Tensor) -> tf.Tensor:
        return tf.map_fn(
            preprocess,
            encoded,
            fn_output_signature=tf.TensorSpec(shape, tf.float32),
            parallel_iterations=16,
        )

    return decode


def make_dataset(
    files: list[str],
    manifest: manifest_lib.Manifest,
    config: TrainConfig,
    *,
    training: bool,
    augmenter: Callable[[tf.Tensor], tf.Tensor] | None = None,
) -> tf.data.Dataset:
    """``(features, label)`` batches of one split.

    Features are the raw stored embedding (the model normalises it) or the preprocessed image.
    Shuffling and augmentation happen only when ``training``.
    """
    spec = features.feature_spec(manifest.backbone.embedding_dim)
    key = features.IMAGE_ENCODED if config.uses_images else features.EMBEDDING
    wanted = {key: spec[key], features.LABEL: spec[features.LABEL]}
    dataset = tf.data.TFRecordDataset(
        files, compression_type=features.TFRECORD_COMPRESSION, num_parallel_reads=AUTOTUNE
    )
    if training:
        dataset = dataset.shuffle(10_000, seed=config.seed, reshuffle_each_iteration=True)
    if config.uses_images:
        preprocess, _ = image_preprocessor(config, manifest)

        def parse_image(record):
            parsed = tf.io.parse_single_example(record, wanted)
            return preprocess(parsed[key]), parsed[features.LABEL]

        dataset = dataset.map(parse_image, num_parallel_calls=AUTOTUNE, deterministic=not training)
        dataset = dataset.batch(config.batch_size)
        if training and augmenter is not None:
            dataset = dataset.map(lambda x, y: (augmenter(x), y), num_parallel_calls=AUTOTUNE)
    else:
        dataset = dataset.batch(config.batch_size).map(
            lambda records: _parse_batch(records, wanted, key), num_parallel_calls=AUTOTUNE
        )
        if not training:
            dataset = dataset.cache()
    return dataset.prefetch(AUTOTUNE)


def _parse_batch(records, wanted, key):
    parsed = tf.io.parse_example(records, wanted)
    return parsed[key], parsed[features.LABEL]


def class_weights(manifest: manifest_lib.Manifest) -> dict[int, float]:
    """``balanced`` weights from the train split's label counts: n / (C * n_c)."""
    counts = manifest.splits[csv_format.TRAIN]["labels"]
    total = sum(counts.values())
    present = [label for label in manifest.labels if counts.get(label, 0) > 0]
    weights = {}
    for i, label in enumerate(manifest.labels):
        n = counts.get(label, 0)
        weights[i] = total / (len(present) * n) if n else 0.0
    return weights
