"""Input pipelines of the trainer: TFRecords -> parse -> (augment, train only) -> batch -> prefetch.

Image preprocessing is defined once here (and in ``backbones.inputs`` for backbones) and used
both for the datasets and inside the serving export, so training and serving see the same pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import posixpath
from collections.abc import Callable

import numpy as np
import tensorflow as tf

from backbones.inputs import decode_image, image_to_backbone_input
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from training import sampling
from training.config import FEATURES_EMBEDDING, TrainConfig

_LOGGER = logging.getLogger(__name__)
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Dataset:
    """A validated preprocess output dir: its manifest, and each split's files and record count.

    ``fingerprint`` names its content (:func:`fingerprint`); ``normalization`` is the embedding's
    mean and standard deviation (:func:`embedding_normalization`), None for from-scratch nets.
    ``train_indices`` are the train records trained on with ``--examples_per_class`` (positions
    in the train split read in file order, :func:`read_labels`), None for all of them;
    ``train_labels`` are their label counts. ``counts`` always describe the data dir.
    ``views`` is how many augmented views of each train image (``--train_views``) the run's
    embedding head samples from, 0 for none (:func:`sample_views`).
    """

    manifest: manifest_lib.Manifest
    files: dict[str, list[str]]
    counts: dict[str, int]
    fingerprint: str = ""
    normalization: tuple[np.ndarray, np.ndarray] | None = None
    train_indices: np.ndarray | None = None
    train_labels: dict[str, int] | None = None
    views: int = 0

    def examples(self, split: str) -> int:
        """How many examples of ``split`` the run uses (the draw, for train with K per class)."""
        if split == csv_format.TRAIN and self.train_indices is not None:
            return len(self.train_indices)
        return self.counts[split]

    def indices(self, split: str) -> np.ndarray | None:
        """The records of ``split`` the run uses, None for all."""
        return self.train_indices if split == csv_format.TRAIN else None

    def subsample_record(self, config: TrainConfig) -> dict | None:
        """What ``config.json`` and ``metrics.json`` record of ``--examples_per_class``."""
        if self.train_indices is None:
            return None
        return {
            "examples_per_class": config.examples_per_class,
            "subsample_seed": config.subsample_seed,
            "train_examples": len(self.train_indices),
            "train_labels": self.train_labels,
            "train_split_examples": self.counts[csv_format.TRAIN],
        }


def load(config: TrainConfig) -> Dataset:
    """Reads and validates the data dir before any training starts.

    Raises:
      UsageError: missing/empty data dir, unreadable or incompatible manifest, an empty split,
        shards whose embedding size is not the manifest's, images needed but not stored, a
        missing ``transform_fn/``, or a corrupt TFRecord (naming the file).
    """
    if not tf.io.gfile.isdir(config.data_dir):
        raise UsageError(f"--data_dir {config.data_dir} does not exist")
    manifest = _read_manifest(config.data_dir)
    files, counts = {}, {}
    for split in csv_format.SPLITS:
        files[split] = split_files(config.data_dir, split)
        counts[split] = count_records(files[split])
        if counts[split] == 0:
            raise UsageError(
                f"--data_dir: the {split} split has no examples; rerun hubflow-preprocess with "
                f"more images or a larger --{split}_fraction"
                if split != csv_format.TRAIN
                else f"--data_dir: the {split} split has no examples"
            )
    if len(manifest.labels) < 2:
        raise UsageError(f"--data_dir: a classifier needs at least 2 labels, got {manifest.labels}")
    _check_first_record(config, manifest, files[csv_format.TRAIN][0])
    normalization = None
    if not config.from_scratch:
        normalization = _normalization(config.data_dir, manifest.backbone.embedding_dim)
    dataset = Dataset(manifest, files, counts, fingerprint(manifest, files), normalization)
    if config.views and not config.uses_images:
        dataset.views = manifest.train_views().count
        if dataset.views:
            _check_views(manifest, files[csv_format.TRAIN][0], dataset.views)
    if config.examples_per_class is not None:
        _draw_train_examples(config, dataset)
    return dataset


def _draw_train_examples(config: TrainConfig, dataset: Dataset) -> None:
    """Sets ``dataset.train_indices``: ``--examples_per_class`` K per class, drawn with
    ``--subsample_seed`` by :func:`training.sampling.per_class_indices`.

    Raises:
      UsageError: a class has fewer than K train examples (naming the class).
    """
    k, labels = config.examples_per_class, dataset.manifest.labels
    train_labels = read_labels(dataset.files[csv_format.TRAIN])
    counts = np.bincount(train_labels, minlength=len(labels))
    for index, label in enumerate(labels):
        if counts[index] < k:
            raise UsageError(
                f"--examples_per_class {k}: class {label!r} has {counts[index]} train examples"
            )
    dataset.train_indices = sampling.per_class_indices(train_labels, k, config.subsample_seed)
    drawn = np.bincount(train_labels[dataset.train_indices], minlength=len(labels))
    dataset.train_labels = {label: int(n) for label, n in zip(labels, drawn, strict=True)}
    _LOGGER.info(
        "--examples_per_class %d --subsample_seed %d: training on %d of %d train examples",
        k,
        config.subsample_seed,
        len(dataset.train_indices),
        len(train_labels),
    )


def read_labels(files: list[str]) -> np.ndarray:
    """The label index of every record of ``files``, in file order (shard after shard).

    ``--examples_per_class`` draws its positions from this order: any reader that reads a
    split's shards one after the other in sorted order (as :func:`split_files` lists them, and
    ``schemas.features.read_dataset`` reads them) finds the same records at the same positions.
    """
    spec = {features.LABEL: features.feature_spec(1)[features.LABEL]}
    records = tf.data.TFRecordDataset(files, features.tfrecord_compression(files))
    labels = records.map(lambda r: tf.io.parse_single_example(r, spec)[features.LABEL])
    chunks = list(labels.batch(4096).as_numpy_iterator())
    return np.concatenate(chunks).astype(np.int64) if chunks else np.zeros(0, np.int64)


def _one_line(error: BaseException) -> str:
    return " ".join(str(getattr(error, "message", None) or error).split())[:300]


def _read_manifest(data_dir: str) -> manifest_lib.Manifest:
    path = manifest_lib.manifest_path(data_dir)
    try:
        return manifest_lib.read_manifest(data_dir)
    except (ValueError, KeyError, TypeError) as e:  # json.JSONDecodeError is a ValueError
        message = _one_line(e)
        raise UsageError(
            f"--data_dir: {message}" if path in message else f"--data_dir: {path}: {message}"
        ) from None


def _check_first_record(config: TrainConfig, manifest: manifest_lib.Manifest, path: str) -> None:
    """The first record of ``path`` holds an embedding of the manifest's size (and an image)."""
    spec = {
        features.EMBEDDING: tf.io.VarLenFeature(tf.float32),
        features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value=""),
    }
    try:
        first = next(iter(tf.data.TFRecordDataset([path], features.tfrecord_compression(path))))
        parsed = tf.io.parse_single_example(first, spec)
    except tf.errors.OpError as e:
        raise UsageError(f"corrupt TFRecord file {path}: {_one_line(e)}") from None
    size, expected = (
        int(tf.size(parsed[features.EMBEDDING].values)),
        manifest.backbone.embedding_dim,
    )
    if size != expected:
        raise UsageError(
            f"--data_dir: {path} holds embeddings of {size} values but manifest.json says "
            f"embedding_dim {expected}: they come from different runs; rerun hubflow-preprocess"
        )
    if config.uses_images and not parsed[features.IMAGE_ENCODED].numpy():
        raise UsageError("--features image: this dataset was written without images")


def _check_views(manifest: manifest_lib.Manifest, path: str, views: int) -> None:
    """The first train record holds the ``views`` x D view embeddings the manifest promises."""
    spec = {features.EMBEDDING_VIEWS: tf.io.VarLenFeature(tf.float32)}
    first = next(iter(tf.data.TFRecordDataset([path], features.tfrecord_compression(path))))
    size = int(tf.size(tf.io.parse_single_example(first, spec)[features.EMBEDDING_VIEWS].values))
    expected = views * manifest.backbone.embedding_dim
    if size != expected:
        raise UsageError(
            f"--data_dir: {path} holds {size} view values but manifest.json says {views} train "
            f"views of {manifest.backbone.embedding_dim}: rerun hubflow-preprocess (or pass "
            "--no-views)"
        )


def _normalization(data_dir: str, embedding_dim: int) -> tuple[np.ndarray, np.ndarray]:
    transform_dir = f"{data_dir.rstrip('/')}/{manifest_lib.TRANSFORM_FN_DIR}"
    if not tf.io.gfile.isdir(transform_dir):
        raise UsageError(
            f"--data_dir: {transform_dir}/ is missing (the embedding statistics "
            "hubflow-preprocess writes); rerun hubflow-preprocess"
        )
    try:
        return embedding_normalization(data_dir, embedding_dim)
    except (OSError, ValueError, tf.errors.OpError) as e:
        raise UsageError(f"--data_dir: {transform_dir}/ cannot be used: {_one_line(e)}") from None


def fingerprint(manifest: manifest_lib.Manifest, files: dict[str, list[str]]) -> str:
    """A sha256 naming a dataset's content, recorded next to a model trained on it.

    It covers the manifest's labels, backbone, split and row counts and creation time, and the
    name and byte size of every shard: cheap (no record is read, one stat per shard) and
    independent of where the data dir is (a copy on ``gs://`` is the same data). Relabelled,
    re-split or rewritten data differs in one of these; so does a rerun of hubflow-preprocess on
    the same images (a new creation time), whose model must then be trained afresh rather than
    resumed on data it may not have seen. A shard edited in place to the same byte size under
    an unchanged manifest is not detected.
    """
    data = manifest.to_json()
    identity = {key: data[key] for key in ("labels", "backbone", "splits", "rows", "created")}
    identity["shards"] = sorted(
        (posixpath.basename(path), tf.io.gfile.stat(path).length)
        for paths in files.values()
        for path in paths
    )
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def split_files(data_dir: str, split: str) -> list[str]:
    """The TFRecord shards of one split, sorted (GZIP ones of an older dataset too).

    Raises:
      UsageError: the split holds both kinds of shard (files copied in from another dataset).
    """
    root = data_dir.rstrip("/")
    files = sorted(
        path
        for pattern in features.tfrecord_patterns(split)
        for path in tf.io.gfile.glob(f"{root}/{pattern}")
    )
    try:
        features.tfrecord_compression(files)
    except ValueError as e:
        raise UsageError(f"--data_dir: {e}") from None
    return files


def count_records(files: list[str]) -> int:
    """Counts the records of ``files``, naming the file of the first corrupt record.

    Raises:
      UsageError: when a file is unreadable or holds a corrupt record.
    """
    total = 0
    for path in files:
        dataset = tf.data.TFRecordDataset(path, features.tfrecord_compression(path))
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
    """``encoded bytes (scalar) -> float32 image in [0, 1]`` for the model, and its shape.

    The backbone's input is framed as the dataset's embeddings were (``--crop_fraction``, from
    the manifest), so image training and the export see what the stored embeddings saw.
    """
    if config.from_scratch:
        size, channels = config.image_size, config.channels

        def scratch(data: tf.Tensor) -> tf.Tensor:
            image = image_to_backbone_input(decode_image(data), size)
            return tf.image.rgb_to_grayscale(image) if channels == 1 else image

        return scratch, (size, size, channels)
    size, crop_fraction = manifest.backbone.image_size, manifest.crop_fraction()

    def backbone_input(data: tf.Tensor) -> tf.Tensor:
        return image_to_backbone_input(decode_image(data), size, crop_fraction)

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


# Parsed features are cached in memory (once, before shuffling) when they fit in this budget:
# heads on embeddings and small from-scratch images are otherwise bound by re-reading and
# decompressing records that also carry the JPEG, every epoch.
CACHE_LIMIT_BYTES = 2 << 30


def _records(files: list[str], indices: np.ndarray | None) -> tf.data.Dataset:
    """The serialized records of ``files``; only those at ``indices`` (file order) if given."""
    if indices is None:
        return tf.data.TFRecordDataset(
            files, features.tfrecord_compression(files), num_parallel_reads=AUTOTUNE
        )
    records = tf.data.TFRecordDataset(files, features.tfrecord_compression(files))
    keep = np.zeros(int(np.max(indices)) + 2 if len(indices) else 1, bool)
    keep[indices] = True  # the last entry stays False: it stands for every later position
    keep = tf.constant(keep)
    last = tf.size(keep, out_type=tf.int64) - 1
    records = records.enumerate().filter(lambda i, _: tf.gather(keep, tf.minimum(i, last)))
    return records.map(lambda _, record: record)


def _parser(
    manifest: manifest_lib.Manifest, config: TrainConfig, views: int = 0
) -> tuple[Callable, int]:
    """``record -> (features, label)`` for the model, and the bytes of one parsed example.

    With ``views`` (train records of a dataset with views), an embedding example's features are
    the centre and its views, ``[1 + views, D]``, for :func:`sample_views` to draw from.
    """
    spec = features.feature_spec(manifest.backbone.embedding_dim)
    key = features.IMAGE_ENCODED if config.uses_images else features.EMBEDDING
    wanted = {key: spec[key], features.LABEL: spec[features.LABEL]}
    if config.uses_images:
        preprocess, shape = image_preprocessor(config, manifest)

        def parse_image(record):
            parsed = tf.io.parse_single_example(record, wanted)
            return preprocess(parsed[key]), parsed[features.LABEL]

        return parse_image, 4 * shape[0] * shape[1] * shape[2]

    if views:
        wanted.update(features.views_feature_spec(manifest.backbone.embedding_dim, views))

        def parse_views(record):
            parsed = tf.io.parse_single_example(record, wanted)
            stacked = tf.concat([parsed[key][tf.newaxis], parsed[features.EMBEDDING_VIEWS]], 0)
            return stacked, parsed[features.LABEL]

        return parse_views, 4 * (1 + views) * manifest.backbone.embedding_dim

    def parse_embedding(record):
        parsed = tf.io.parse_single_example(record, wanted)
        return parsed[key], parsed[features.LABEL]

    return parse_embedding, 4 * manifest.backbone.embedding_dim


def sample_views(dataset: tf.data.Dataset, seed: int) -> tf.data.Dataset:
    """``([B, 1 + K, D], label)`` batches -> ``([B, D], label)``: one of the centre and its K
    views per example, drawn uniformly, anew on every pass (epoch).

    The draws come from one ``tf.random.Generator`` seeded with ``seed`` and advanced by a
    sequential map: the same seed gives the same views, batch after batch, epoch after epoch.
    """
    generator = tf.random.Generator.from_seed(seed)

    def pick(x, y):
        shape = tf.shape(x)
        index = generator.uniform([shape[0]], minval=0, maxval=shape[1], dtype=tf.int32)
        return tf.gather(x, index, axis=1, batch_dims=1), y

    return dataset.map(pick)


def batches(
    dataset: tf.data.Dataset, config: TrainConfig, *, training: bool, num_examples: int
) -> tf.data.Dataset:
    """Shuffles (train) and batches parsed, in-memory ``(features, label)`` examples.

    The tail of :func:`make_dataset` for cached examples; the head tuner
    (:mod:`training.tuning`) feeds its in-memory arrays through it too, so a candidate sees
    the batches the trainer's own head stage sees with the same seed. Train examples with
    views (``[1 + K, D]`` embeddings) come out as one sampled view each (:func:`sample_views`).
    """
    if training:
        dataset = dataset.shuffle(
            min(num_examples, 100_000), seed=config.seed, reshuffle_each_iteration=True
        )
    dataset = dataset.batch(config.batch_size)
    if training and _has_views(dataset):
        dataset = sample_views(dataset, config.seed)
    return dataset


def _has_views(batched: tf.data.Dataset) -> bool:
    """Whether embedding batches hold a centre and its views, ``[B, 1 + K, D]``."""
    features_spec = batched.element_spec[0]
    return isinstance(features_spec, tf.TensorSpec) and features_spec.shape.rank == 3


def make_dataset(
    files: list[str],
    manifest: manifest_lib.Manifest,
    config: TrainConfig,
    *,
    training: bool,
    augmenter: Callable[[tf.Tensor], tf.Tensor] | None = None,
    num_examples: int | None = None,
    indices: np.ndarray | None = None,
    views: int = 0,
) -> tf.data.Dataset:
    """``(features, label)`` batches of one split.

    Features are the raw stored embedding (the model normalises it) or the preprocessed image.
    Shuffling and augmentation happen only when ``training``. Parsed (and, for images,
    decoded and resized) examples are cached in memory when ``num_examples`` says they fit in
    :data:`CACHE_LIMIT_BYTES`; backbone-sized images are not cached. With ``indices`` only the
    records at those positions (file order) are used, e.g. ``--examples_per_class``. With
    ``views`` (train, a dataset with views) each example's embedding is drawn per epoch from its
    centre and its views (:func:`sample_views`).
    """
    parse, example_bytes = _parser(manifest, config, views if training else 0)
    dataset = _records(files, indices)
    cache = num_examples is not None and num_examples * example_bytes <= CACHE_LIMIT_BYTES
    if training and not cache:
        dataset = dataset.shuffle(10_000, seed=config.seed, reshuffle_each_iteration=True)
    dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=not training or cache)
    if cache:
        # The count is known (counted at load): Keras then iterates epochs as it does over the
        # in-memory arrays of training.tuning, so both see the same batches, epoch after epoch.
        cached = dataset.cache().apply(tf.data.experimental.assert_cardinality(num_examples))
        dataset = batches(cached, config, training=training, num_examples=num_examples)
    else:
        dataset = dataset.batch(config.batch_size)
        if training and views:
            dataset = sample_views(dataset, config.seed)
    if training and augmenter is not None:
        dataset = dataset.map(lambda x, y: (augmenter(x), y), num_parallel_calls=AUTOTUNE)
    return dataset.prefetch(AUTOTUNE)


def embedding_arrays(
    config: TrainConfig, data: Dataset, split: str, *, views: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """The stored embeddings ``[N, D]`` and labels ``[N]`` of ``split``, in memory.

    In the order :func:`make_dataset` caches them before shuffling, and only the records the
    run uses (:meth:`Dataset.indices`). With ``views``, the train split of a run that samples
    views gives ``[N, 1 + K, D]``: each centre and its views, as :func:`make_dataset` caches them.
    """
    count = data.views if views and split == csv_format.TRAIN else 0
    embedding_config = dataclasses.replace(config, features=FEATURES_EMBEDDING)
    parse, _ = _parser(data.manifest, embedding_config, count)
    dataset = _records(data.files[split], data.indices(split))
    dataset = dataset.map(parse, num_parallel_calls=AUTOTUNE, deterministic=True).batch(1024)
    xs, ys = [], []
    for x, y in dataset.as_numpy_iterator():
        xs.append(x)
        ys.append(y)
    dim = data.manifest.backbone.embedding_dim
    if not xs:
        shape = [0, 1 + count, dim] if count else [0, dim]
        return np.zeros(shape, np.float32), np.zeros([0], np.int64)
    return np.concatenate(xs), np.concatenate(ys)


def class_weights(data: Dataset) -> dict[int, float]:
    """``balanced`` weights from the trained-on label counts: n / (C * n_c)."""
    manifest = data.manifest
    counts = data.train_labels or manifest.splits[csv_format.TRAIN]["labels"]
    total = sum(counts.values())
    present = [label for label in manifest.labels if counts.get(label, 0) > 0]
    weights = {}
    for i, label in enumerate(manifest.labels):
        n = counts.get(label, 0)
        weights[i] = total / (len(present) * n) if n else 0.0
    return weights


def make_split_datasets(
    config: TrainConfig, data: Dataset, augmenter: Callable | None = None
) -> dict[str, tf.data.Dataset]:
    """``(features, label)`` batches of every split; only train is shuffled and augmented."""
    return {
        split: make_dataset(
            data.files[split],
            data.manifest,
            config,
            training=split == csv_format.TRAIN,
            augmenter=augmenter,
            num_examples=data.examples(split),
            indices=data.indices(split),
            views=data.views if split == csv_format.TRAIN else 0,
        )
        for split in csv_format.SPLITS
    }
