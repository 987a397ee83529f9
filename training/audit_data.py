"""What the audit reads from a preprocess output dir: every split's records, and their images.

:func:`load` reads the manifest and, with ``tf.data`` over the GZIP TFRecords, each split's
embeddings, labels, source URIs and content hashes (the unlabeled split too, when the data dir
has one). The JPEGs are not kept: :func:`read_images` reads back only those the report shows,
and :func:`thumbnail` shrinks them. The data dir is read, never written.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import tensorflow as tf
from PIL import Image

from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.cli import UsageError
from training import data

THUMB_MAX_SIDE = 160
THUMB_QUALITY = 85
READ_BATCH = 512


@dataclasses.dataclass
class AuditData:
    """All records of a data dir, one row each, in split order (``ALL_SPLITS``), then file order.

    ``labels`` holds ``features.UNLABELED_INDEX`` for the unlabeled split's records.
    """

    data_dir: str
    manifest: manifest_lib.Manifest
    embeddings: np.ndarray  # float32 [N, D]
    labels: np.ndarray  # int64 [N]
    splits: np.ndarray  # str [N]
    uris: list[str]
    sha256: list[str]
    files: dict[str, list[str]]

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest.labels)

    def rows(self, *splits: str) -> np.ndarray:
        """Indices of the records in ``splits``."""
        return np.flatnonzero(np.isin(self.splits, list(splits)))

    def count(self, split: str) -> int:
        return int(np.sum(self.splits == split))


def _one_line(error: BaseException) -> str:
    return " ".join(str(getattr(error, "message", None) or error).split())[:300]


def read_manifest(data_dir: str) -> manifest_lib.Manifest:
    """The data dir's manifest.

    Raises:
      UsageError: the dir or its manifest is missing or unreadable.
    """
    if not tf.io.gfile.isdir(data_dir):
        raise UsageError(f"--data_dir {data_dir} does not exist")
    try:
        return manifest_lib.read_manifest(data_dir)
    except (ValueError, KeyError, TypeError, tf.errors.OpError) as e:
        raise UsageError(f"--data_dir: {_one_line(e)}") from None


def load(data_dir: str) -> AuditData:
    """Reads every split's records.

    Raises:
      UsageError: no manifest, fewer than 2 labels, no labeled training record, a corrupt
        shard, embeddings of another size than the manifest's, or shards that do not hold what
        the manifest counts (the dir changed after preprocessing, or a run into it is unfinished).
    """
    manifest = read_manifest(data_dir)
    if len(manifest.labels) < 2:
        raise UsageError(f"--data_dir: an audit needs at least 2 labels, got {manifest.labels}")
    dim = manifest.backbone.embedding_dim
    wanted = (features.EMBEDDING, features.LABEL, features.IMAGE_SOURCE, features.IMAGE_SHA256)
    spec = {key: features.feature_spec(dim)[key] for key in wanted}
    parts: dict[str, list[np.ndarray]] = {key: [] for key in wanted}
    splits, files = [], {}
    for split in csv_format.ALL_SPLITS:
        files[split] = data.split_files(data_dir, split)
        count = 0
        for batch in _batches(files[split], spec, dim):
            for key in wanted:
                parts[key].append(batch[key])
            count += len(batch[features.LABEL])
        expected = manifest.split_count(split)
        if count != expected:
            raise UsageError(
                f"--data_dir: the {split} split holds {count} records but manifest.json counts "
                f"{expected}: the dir changed after preprocessing or a run into it has not "
                "finished; rerun hubflow-preprocess"
            )
        splits += [split] * count
    if not splits.count(csv_format.TRAIN):
        raise UsageError("--data_dir: the train split has no examples")

    def joined(key, dtype, shape):
        return np.concatenate(parts[key]).astype(dtype) if parts[key] else np.zeros(shape, dtype)

    return AuditData(
        data_dir=data_dir,
        manifest=manifest,
        embeddings=joined(features.EMBEDDING, np.float32, (0, dim)),
        labels=joined(features.LABEL, np.int64, (0,)),
        splits=np.asarray(splits, dtype=object).astype(str),
        uris=[b.decode("utf-8") for b in joined(features.IMAGE_SOURCE, object, (0,))],
        sha256=[b.decode("ascii") for b in joined(features.IMAGE_SHA256, object, (0,))],
        files=files,
    )


def _batches(paths: list[str], spec: dict, dim: int):
    """Parsed batches of ``paths`` as numpy dicts.

    Raises:
      UsageError: a corrupt file, or a record whose embedding is not ``dim`` long.
    """
    if not paths:
        return
    dataset = tf.data.TFRecordDataset(paths, features.tfrecord_compression(paths))
    dataset = dataset.batch(READ_BATCH).map(lambda records: tf.io.parse_example(records, spec))
    iterator = iter(dataset)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.InvalidArgumentError as e:
            raise UsageError(
                f"--data_dir: a record in {', '.join(paths)} does not match the manifest "
                f"(embedding_dim {dim}): {_one_line(e)}; rerun hubflow-preprocess"
            ) from None
        except tf.errors.OpError as e:
            raise UsageError(
                f"--data_dir: corrupt TFRecord in {', '.join(paths)}: {_one_line(e)}"
            ) from None
        yield {key: value.numpy() for key, value in batch.items()}


def read_images(audit: AuditData, rows: np.ndarray) -> dict[int, bytes]:
    """The stored JPEG bytes of the records ``rows`` (indices into ``audit``), by row."""
    wanted = {audit.sha256[i]: int(i) for i in rows}
    if not wanted:
        return {}
    keys = (features.IMAGE_ENCODED, features.IMAGE_SHA256)
    spec = {key: features.feature_spec(audit.manifest.backbone.embedding_dim)[key] for key in keys}
    found: dict[int, bytes] = {}
    splits = sorted({audit.splits[i] for i in wanted.values()})
    for split in splits:
        for batch in _batches(audit.files[split], spec, audit.manifest.backbone.embedding_dim):
            for digest, jpeg in zip(
                batch[features.IMAGE_SHA256], batch[features.IMAGE_ENCODED], strict=True
            ):
                row = wanted.get(digest.decode("ascii"))
                if row is not None:
                    found[row] = jpeg
    return found


def thumbnail(jpeg: bytes, max_side: int = THUMB_MAX_SIDE) -> bytes:
    """The image shrunk to at most ``max_side`` px on its longer side, as JPEG bytes."""
    with Image.open(io.BytesIO(jpeg)) as image:
        image.draft("RGB", (max_side, max_side))
        image = image.convert("RGB")
        image.thumbnail((max_side, max_side), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=THUMB_QUALITY)
    return buffer.getvalue()
