"""Feature keys and the TFExample layout of hubflow's TFRecords.

Keys follow the TensorFlow object-detection API naming. The parse spec, the
``tensorflow_metadata`` schema and the example builder below are all derived from the one
table of keys, so the writer (``pipeline/``) and the readers (``training/``) cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import tensorflow as tf

IMAGE_ENCODED = "image/encoded"
IMAGE_FORMAT = "image/format"
IMAGE_HEIGHT = "image/height"
IMAGE_WIDTH = "image/width"
IMAGE_SOURCE = "image/source"
IMAGE_SHA256 = "image/sha256"
LABEL = "label"
LABEL_TEXT = "label/text"
EMBEDDING = "embedding"
# Train records of a dataset made with ``--train_views K`` > 0 also hold K augmented views'
# embeddings, ``[K, D]`` (row-major); no other record has the key. Not in ``ALL_KEYS``, the keys
# every record holds, nor in the tf.Transform spec: the statistics stay the centre view's.
EMBEDDING_VIEWS = "embedding/views"

IMAGE_FORMAT_JPEG = b"jpeg"

# ``LABEL`` of a record in the unlabeled split (whose ``LABEL_TEXT`` is empty).
UNLABELED_INDEX = -1

# TFRecord files, one file-name prefix per split: uncompressed. A record is mostly a JPEG, which
# deflate cannot shrink: GZIP saved 5-8% of the bytes for about 0.6 ms of CPU per record written
# and 0.4 ms per record read, each time one is read. Datasets written before that change hold
# GZIP files named ``.tfrecord.gz``; every reader takes both, by the file name.
TFRECORD_SUFFIX = ".tfrecord"
GZIP_TFRECORD_SUFFIX = ".tfrecord.gz"

_BYTES_KEYS = (IMAGE_ENCODED, IMAGE_FORMAT, IMAGE_SOURCE, IMAGE_SHA256, LABEL_TEXT)
_INT_KEYS = (IMAGE_HEIGHT, IMAGE_WIDTH, LABEL)
ALL_KEYS = _BYTES_KEYS + _INT_KEYS + (EMBEDDING,)
OPTIONAL_KEYS = (EMBEDDING_VIEWS,)


def tfrecord_pattern(split: str) -> str:
    """File-name glob (relative to the output dir) of the shards of one split that the job
    writes."""
    return f"{split}-*{TFRECORD_SUFFIX}"


def tfrecord_patterns(split: str) -> tuple[str, str]:
    """File-name globs of every shard of one split a reader takes: :func:`tfrecord_pattern`,
    and the GZIP shards of datasets written before records were uncompressed."""
    return tfrecord_pattern(split), f"{split}-*{GZIP_TFRECORD_SUFFIX}"


def tfrecord_compression(files: str | Sequence[str]) -> str:
    """The ``compression_type`` that ``tf.data.TFRecordDataset`` needs for ``files``: ``"GZIP"``
    for ``.tfrecord.gz`` files, ``""`` for the others.

    Raises:
      ValueError: ``files`` mix the two (a dataset holds one kind; a mix is files copied in
        from another dataset).
    """
    paths = [files] if isinstance(files, str) else list(files)
    kinds = {p.endswith(GZIP_TFRECORD_SUFFIX) for p in paths}
    if len(kinds) > 1:
        gzip = next(p for p in paths if p.endswith(GZIP_TFRECORD_SUFFIX))
        plain = next(p for p in paths if not p.endswith(GZIP_TFRECORD_SUFFIX))
        raise ValueError(
            f"{plain} and {gzip} are TFRecords of two different datasets (uncompressed and GZIP);"
            " one dataset holds one kind"
        )
    return "GZIP" if kinds == {True} else ""


def feature_spec(embedding_dim: int) -> dict[str, tf.io.FixedLenFeature]:
    """The parse spec of one hubflow TFExample.

    Args:
      embedding_dim: length of the backbone's feature vector (from the manifest).
    """
    if embedding_dim <= 0:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    spec: dict[str, tf.io.FixedLenFeature] = {}
    for key in _BYTES_KEYS:
        spec[key] = tf.io.FixedLenFeature([], tf.string)
    for key in _INT_KEYS:
        spec[key] = tf.io.FixedLenFeature([], tf.int64)
    spec[EMBEDDING] = tf.io.FixedLenFeature([embedding_dim], tf.float32)
    return spec


def views_feature_spec(embedding_dim: int, views: int) -> dict[str, tf.io.FixedLenFeature]:
    """The parse spec of a train record's ``EMBEDDING_VIEWS``: ``[views, embedding_dim]``.

    Only for the train split of a dataset whose manifest records ``views`` > 0 (the other
    splits' records have no views, and parsing them with this spec fails).
    """
    if views <= 0:
        raise ValueError(f"views must be positive, got {views}")
    return {EMBEDDING_VIEWS: tf.io.FixedLenFeature([views, embedding_dim], tf.float32)}


def transform_feature_spec(embedding_dim: int) -> dict[str, tf.io.FixedLenFeature]:
    """The raw-feature spec tf.Transform analyses: the embedding alone.

    Serving feeds only the embedding through the transform graph, so it is the only input.
    """
    return {EMBEDDING: feature_spec(embedding_dim)[EMBEDDING]}


def metadata_schema(embedding_dim: int):
    """The ``tensorflow_metadata`` Schema proto of the TFRecords."""
    from tensorflow_transform.tf_metadata import schema_utils

    return schema_utils.schema_from_feature_spec(feature_spec(embedding_dim))


def _bytes(value: bytes) -> tf.train.Feature:
    return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int(value: int) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def make_example(
    *,
    jpeg: bytes,
    height: int,
    width: int,
    source: str,
    sha256: str,
    label: int,
    label_text: str,
    embedding,
    views=None,
) -> tf.train.Example:
    """Builds one TFExample in hubflow's layout.

    ``views``: the ``[K, D]`` embeddings of a train image's augmented views, or None (no
    ``EMBEDDING_VIEWS`` feature: the record is byte for byte what it was before views existed).
    """
    features: Mapping[str, tf.train.Feature] = {
        IMAGE_ENCODED: _bytes(jpeg),
        IMAGE_FORMAT: _bytes(IMAGE_FORMAT_JPEG),
        IMAGE_HEIGHT: _int(height),
        IMAGE_WIDTH: _int(width),
        IMAGE_SOURCE: _bytes(source.encode("utf-8")),
        IMAGE_SHA256: _bytes(sha256.encode("ascii")),
        LABEL: _int(label),
        LABEL_TEXT: _bytes(label_text.encode("utf-8")),
        EMBEDDING: tf.train.Feature(
            float_list=tf.train.FloatList(value=np.asarray(embedding, np.float32).tolist())
        ),
    }
    if views is not None:
        flat = np.asarray(views, np.float32).reshape(-1).tolist()
        features = {
            **features,
            EMBEDDING_VIEWS: tf.train.Feature(float_list=tf.train.FloatList(value=flat)),
        }
    return tf.train.Example(features=tf.train.Features(feature=features))


def parse_examples(serialized: tf.Tensor, embedding_dim: int) -> dict[str, tf.Tensor]:
    """Parses a batch of serialized examples with :func:`feature_spec`."""
    return tf.io.parse_example(serialized, feature_spec(embedding_dim))


def read_dataset(file_pattern: str | list[str], embedding_dim: int) -> tf.data.Dataset:
    """Reads one split's TFRecords back as a dataset of parsed feature dicts.

    ``file_pattern`` is a glob or a list of files; GZIP files (``.tfrecord.gz``) of datasets
    written before records were uncompressed read as well.
    """
    files = tf.io.gfile.glob(file_pattern) if isinstance(file_pattern, str) else file_pattern
    spec = feature_spec(embedding_dim)
    compression = tfrecord_compression(files)
    return tf.data.TFRecordDataset(sorted(files), compression_type=compression).map(
        lambda record: tf.io.parse_single_example(record, spec)
    )
