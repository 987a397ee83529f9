"""Incremental runs (``--reuse_from DIR``): embed only the images an earlier dataset lacks.

Labeling is a loop: people add a few hundred labeled images and run again. A run with
``--reuse_from DIR`` (an earlier hubflow-preprocess output dir, local or ``gs://``; it may be
``--output_dir`` itself) takes the stored JPEG, its size and its embedding from ``DIR`` for every
image whose bytes (sha256) are there, and decodes, re-encodes and embeds only the others. Labels
and splits come from this run's inputs, as in a full run: a label corrected in the CSV is taken
from the CSV, and the split is decided from the sha256 (or the CSV's split column) as always, so
a reused image keeps its split. The output is the full run's, record for record.

**What must match.** A stored record is the image's JPEG and embedding as ``DIR``'s run made
them; they are this run's only if the earlier run encoded and embedded them as this one would.
:func:`mismatch` compares ``DIR``'s manifest with this run:

* the backbone's content (``backbone_sha256``: a sha256 over the SavedModel's files) and its
  input contract (``image_size``, ``value_range``, ``embedding_dim``). The handle itself is not
  compared: the digest says more (a SavedModel re-saved at the same path is another model, one
  copied elsewhere is the same). A manifest from before the digest was recorded matches nothing.
* the inference runtime that computed the embeddings (``tensorflow`` or ``tflite``: the
  embeddings' precision). The two agree to a cosine of at least 0.9999 (the TFLite parity check),
  but the manifest states one runtime for every record, so a dataset never mixes them.
* the precision the backbone ran in (``--precision``: bfloat16 embeddings are within about
  0.997-0.999 cosine of float32's); a manifest from before it was recorded is float32.
* ``--max_image_side`` and ``--jpeg_quality``: what the stored JPEG is, and the pixels it was
  embedded from; ``--crop_fraction``: how those pixels were framed into the backbone's input
  (a manifest from before it was recorded was squashed, 0). Other options do not change a stored image: ``--max_image_pixels`` and
  ``--max_file_bytes`` are checked again on every row (below), the split fractions, the label
  dictionary and the batch size only decide labels, splits and batching.

**Views** (``--train_views``, :mod:`pipeline.views`) are not compared at launch: they matter
only for the records this run writes to train, which are known per record. A stored record
written to another split here drops any views it holds; one written to train, when this run
makes K > 0 views, is taken only with at least K stored views made by the same recipe and seed
(view i depends on the image, the seed and i alone, so the first K are this run's), and is
otherwise encoded and embedded again, views and all. A record's split can change between runs
(other fractions, a CSV split column), so this is decided per record, not per dataset.

Package versions (Pillow, TensorFlow) are not compared: an upgrade moves JPEG bytes and
embeddings at the level of JPEG noise, as it moves a full run's. When something differs, nothing
is reused and the run says why in one line (it is not an error): it is then a full run. A
``DIR`` that is not a complete hubflow dataset (no readable ``manifest.json``) is refused.

**How.** Pass 2 still reads and hashes every image (its sha256 is the key) but checks only the
header (format, pixel limit, pixel mode) with this run's limits. The hashes are joined
(``CoGroupByKey``) with the index of ``DIR``'s records, ``(sha256, shard)``, read from its
shards (every split, the unlabeled one too). Only the images without a stored record are then
fully decoded to validate them, as a full run does for every image; a stored image decoded in
full when ``DIR`` was made, and identical bytes decode identically. Duplicates and conflicting
labels are resolved as in a full run. In pass 3, the rows with a stored record are grouped by the
shard that holds it (:class:`ShardRows`), and these groups join the new rows on their way into
``EncodeAndEmbed``. There each group's shard is read once, streaming (:class:`StoredReader`), and
its stored images pass through ``RunInference`` unchanged to the same writers as the new ones.
Only small row records cross the shuffles and the flattens, never image bytes: the DirectRunner
materializes every multi-input flatten in memory, so joining stored and new images after
``RunInference`` held every stored JPEG in memory at once (5.6 GB peak RSS on 10,000 photos). A
record that cannot be used (a shard that became unreadable, a malformed record) sends its row
down the normal path: it is re-encoded and embedded, never dropped.

``DIR`` may be ``--output_dir`` (with ``--overwrite``): the new dataset is written to the staging
folder and replaces the old one only once complete (:mod:`storage.staging`), under the output
dir's lock, so the records read here stay in place for the whole run. Another ``DIR`` is read
without a lock: do not overwrite it while a run reads it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Iterator
from typing import NamedTuple

import apache_beam as beam
import numpy as np
import tensorflow as tf
from apache_beam.pvalue import TaggedOutput
from google.protobuf.message import DecodeError

from pipeline import dataset, remote, sinks, transforms
from pipeline.inference import Embedded
from pipeline.progress import Progress
from pipeline.records import ERRORS, counter
from schemas import features
from schemas import manifest as manifest_lib
from schemas.backbones import CROP_OPTION, CROP_SQUASH, BackboneSpec
from schemas.cli import UsageError
from schemas.csv_format import TRAIN
from schemas.errors import exception_reason

_LOGGER = logging.getLogger(__name__)

FLAG = "--reuse_from"
# CoGroupByKey tags of the join of this run's hashes with the earlier dataset's index.
ROWS = "rows"
STORED = "stored"
# Output of the join: rows whose image the earlier dataset lacks.
NEW = "new"
KNOWN = "known"  # (shard, Accepted): accepted rows whose record is in that shard
# What parsing one malformed record raises: that record is skipped, the rest of its shard read.
RECORD_ERRORS = (DecodeError, ValueError, IndexError)


@dataclasses.dataclass(frozen=True)
class ReusePlan:
    """What a run takes from ``--reuse_from``, decided at launch.

    Attributes:
      source: the ``--reuse_from`` dir (absolute).
      shards: its TFRecord shards, listed at launch (patterns in a dry run of a remote dir).
      skipped: why nothing is reused (the job then runs as a full run), or "".
      note: one line for the log and the dry run's report.
      views: the train views its records hold (none when not read, as in a dry run).
    """

    source: str
    shards: tuple[str, ...] = ()
    skipped: str = ""
    note: str = ""
    views: manifest_lib.TrainViews = manifest_lib.TrainViews()

    @property
    def active(self) -> bool:
        return not self.skipped

    def record(self) -> manifest_lib.Reuse:
        """The manifest's ``reuse`` entry, before the reused records are counted."""
        return manifest_lib.Reuse(self.source, 0, self.skipped)


def _side(value: int | None) -> str:
    return "0 (original size)" if value is None else str(value)


def mismatch(
    previous: manifest_lib.Manifest,
    backbone: BackboneSpec,
    backbone_sha256: str,
    runtime: str,
    max_image_side: int | None,
    jpeg_quality: int,
    precision: str = manifest_lib.PRECISION_FLOAT32,
    crop_fraction: float = CROP_SQUASH,
) -> str | None:
    """Why the earlier dataset's stored JPEGs and embeddings are not what this run would make,
    or None when they are (see the module docstring for what is compared)."""
    before, now = previous.backbone, backbone
    if not previous.backbone_sha256:
        return (
            "its manifest records no backbone digest (made before hubflow recorded one), so its "
            "embeddings cannot be matched to this run's backbone"
        )
    if previous.backbone_sha256 != backbone_sha256:
        return (
            f"it was embedded with another backbone ({before.handle}, sha256 "
            f"{previous.backbone_sha256[:12]}); this run uses {now.handle} "
            f"(sha256 {backbone_sha256[:12]})"
        )
    for what, old, new in (
        ("backbone input size", before.image_size, now.image_size),
        ("backbone value range", tuple(before.value_range), tuple(now.value_range)),
        ("embedding size", before.embedding_dim, now.embedding_dim),
    ):
        if old != new:
            return f"its {what} is {old}, this run's is {new}"
    if previous.inference_runtime != runtime:
        return (
            f"its embeddings were computed with {previous.inference_runtime}, this run embeds "
            f"with {runtime} (see --inference_runtime)"
        )
    if previous.precision != precision:
        return (
            f"its embeddings were computed in {previous.precision}, this run embeds in "
            f"{precision} (see --precision)"
        )
    options = previous.options
    if "max_image_side" not in options or "jpeg_quality" not in options:
        return "its manifest does not record --max_image_side and --jpeg_quality"
    if options["max_image_side"] != max_image_side:
        return (
            f"it was made with --max_image_side {_side(options['max_image_side'])}, "
            f"this run uses {_side(max_image_side)}"
        )
    if options["jpeg_quality"] != jpeg_quality:
        return (
            f"it was made with --jpeg_quality {options['jpeg_quality']}, "
            f"this run uses {jpeg_quality}"
        )
    if previous.crop_fraction() != crop_fraction:
        return (
            f"its embeddings were framed with --{CROP_OPTION} {previous.crop_fraction():g}, "
            f"this run uses {crop_fraction:g}"
        )
    return None


def plan(
    source: str,
    *,
    backbone: BackboneSpec,
    backbone_sha256: str,
    runtime: str,
    max_image_side: int | None,
    jpeg_quality: int,
    precision: str = manifest_lib.PRECISION_FLOAT32,
    crop_fraction: float = CROP_SQUASH,
    dry_run: bool = False,
) -> ReusePlan:
    """Reads ``--reuse_from``'s manifest, compares it with this run and lists its shards.

    A dry run reads a local dir as a run does, and nothing of a remote one: it builds the job
    as if the dir matched, over the shards' patterns.

    Raises:
      UsageError: naming ``--reuse_from``, when the dir holds no complete hubflow dataset.
    """
    if dry_run and not remote.is_local_path(source):
        patterns = tuple(dataset.shard_patterns(source))
        note = (
            f"{FLAG} {source}: not read in a dry run (remote); the job reads its manifest, "
            "compares it with this run and lists its shards at launch"
        )
        return ReusePlan(source, patterns, note=note)
    try:
        previous = manifest_lib.read_manifest(source)
    except ValueError as e:
        raise UsageError(f"{FLAG}: {e}") from None
    reason = mismatch(
        previous,
        backbone,
        backbone_sha256,
        runtime,
        max_image_side,
        jpeg_quality,
        precision,
        crop_fraction,
    )
    if reason:
        note = f"{FLAG} {source}: reusing nothing: {reason}"
        return ReusePlan(source, skipped=reason, note=note)
    shards = tuple(sorted(dataset.shard_paths(source)))
    written = previous.rows.written
    note = (
        f"{FLAG} {source}: {written} stored images in {len(shards)} shards, made with the same "
        "backbone, runtime and image options; only images not among them are embedded"
    )
    return ReusePlan(source, shards, note=note, views=previous.train_views())


# ----------------------------------------------------------------------------------------------
# Reading the earlier dataset
# ----------------------------------------------------------------------------------------------


class Stored(NamedTuple):
    """What a stored record gives an incremental run."""

    sha256: str
    jpeg: bytes
    height: int
    width: int
    embedding: np.ndarray
    views: np.ndarray | None = None  # [K, D] of a train record made with --train_views


def parse_stored(record: bytes) -> Stored:
    """The image fields of one serialized hubflow TFExample (labels and source are not used).

    Raises:
      RECORD_ERRORS: the record is not a hubflow TFExample.
    """
    feature = tf.train.Example.FromString(record).features.feature
    views = None
    if features.EMBEDDING_VIEWS in feature:
        views = np.asarray(feature[features.EMBEDDING_VIEWS].float_list.value, dtype=np.float32)

    def one(key: str, kind: str):
        values = getattr(feature[key], kind).value
        if len(values) != 1:
            raise ValueError(f"{key} holds {len(values)} values")
        return values[0]

    return Stored(
        sha256=one(features.IMAGE_SHA256, "bytes_list").decode("ascii"),
        jpeg=one(features.IMAGE_ENCODED, "bytes_list"),
        height=int(one(features.IMAGE_HEIGHT, "int64_list")),
        width=int(one(features.IMAGE_WIDTH, "int64_list")),
        embedding=np.asarray(feature[features.EMBEDDING].float_list.value, dtype=np.float32),
        views=views,
    )


def stored_sha256(record: bytes) -> str:
    """The ``image/sha256`` of one serialized hubflow TFExample (cheaper than
    :func:`parse_stored`: the embedding is not converted).

    Raises:
      RECORD_ERRORS: the record is not a hubflow TFExample.
    """
    values = tf.train.Example.FromString(record).features.feature[features.IMAGE_SHA256]
    return values.bytes_list.value[0].decode("ascii")


def stored_problem(stored: Stored, embedding_dim: int) -> str | None:
    """Why a stored record cannot stand for its image in this run, or None."""
    if not stored.jpeg:
        return "no JPEG"
    if stored.height < 1 or stored.width < 1:
        return f"size {stored.width}x{stored.height}"
    if stored.embedding.shape != (embedding_dim,):
        return f"embedding of {stored.embedding.size} values, expected {embedding_dim}"
    if not np.all(np.isfinite(stored.embedding)):
        return "non-finite embedding"
    if stored.views is not None and (
        stored.views.size % embedding_dim or not np.all(np.isfinite(stored.views))
    ):
        return "unusable views"
    return None


def stored_inference(
    stored: Stored,
    split: str,
    embedding_dim: int,
    views: manifest_lib.TrainViews,
    stored_views: manifest_lib.TrainViews,
) -> np.ndarray | None:
    """What RunInference would have given this run for a stored image written to ``split``:
    the embedding ``[D]``, or with this run's ``views`` on a train image the centre and its
    views ``[1 + K, D]``; None when the stored record lacks those views (see the module
    docstring)."""
    if split != TRAIN or views.count == 0:
        return stored.embedding
    if stored.views is None or not views.same_recipe(stored_views):
        return None
    rows = stored.views.reshape(-1, embedding_dim)
    if len(rows) < views.count:
        return None
    return np.concatenate([stored.embedding[np.newaxis], rows[: views.count]])


class IndexShardFn(beam.DoFn):
    """A shard of the earlier dataset -> ``(sha256, shard)`` for each of its records.

    A shard that cannot be read to its end is indexed as far as it could be read (one warning
    line): the images of the rest are embedded again. A record that is not a hubflow TFExample
    is skipped.
    """

    def process(self, shard: str) -> Iterator[tuple[str, str]]:
        count = 0
        try:
            for record in sinks.read_tfrecords(shard):
                count += 1
                try:
                    sha256 = stored_sha256(record)
                except RECORD_ERRORS:
                    continue  # its image, if listed, is embedded again
                yield sha256, shard
        except Exception as e:  # noqa: BLE001 - an unreadable input is reported, not fatal
            _LOGGER.warning(
                "%s: cannot read %s after %d records (%s); the images of the rest are "
                "embedded again",
                FLAG,
                shard,
                count,
                exception_reason(e),
            )


class MatchPreviousFn(beam.DoFn):
    """``(sha256, {rows, stored})`` -> ``(sha256, (rows, shard))`` for an image the earlier
    dataset holds (main output), or each row on ``NEW``. Stored images no row names are dropped.
    """

    def process(self, element) -> Iterator:
        sha256, joined = element
        rows = list(joined[ROWS])
        if not rows:
            return
        shards = sorted(joined[STORED])
        if shards:
            yield sha256, (rows, shards[0])
        else:
            for row in rows:
                yield TaggedOutput(NEW, row)


class ResolveKnownFn(transforms.ResolveDuplicatesFn):
    """:class:`~pipeline.transforms.ResolveDuplicatesFn` for an image the earlier dataset holds:
    the accepted row comes out as ``(shard, Accepted)``."""

    def process(self, element) -> Iterator:
        sha256, (rows, shard) = element
        for out in super().process((sha256, rows)):
            yield out if isinstance(out, TaggedOutput) else (shard, out)


class MatchPrevious(beam.PTransform):
    """Pass 2 of an incremental run, after the header check: ``(sha256, row)`` -> accepted rows.

    Returns a dict: ``accepted`` (rows to encode and embed), ``KNOWN`` (``(shard, Accepted)``:
    rows whose image is stored), ``transforms.DUPLICATES`` and ``ERRORS``.
    """

    def __init__(
        self,
        shards: Iterable[str],
        eval_fraction: float,
        test_fraction: float,
        max_pixels: int,
        max_file_bytes: int,
    ):
        super().__init__()
        self._shards = list(shards)
        self._eval_fraction = eval_fraction
        self._test_fraction = test_fraction
        self._validate = transforms.HashAndValidateFn(max_pixels, max_file_bytes=max_file_bytes)

    def expand(self, hashed):
        index = (
            hashed.pipeline
            | "PreviousShards" >> beam.Create(self._shards)
            | "SpreadShards" >> beam.Reshuffle()
            | "IndexPrevious" >> beam.ParDo(IndexShardFn())
        )
        matched = (
            {ROWS: hashed, STORED: index}
            | "JoinPrevious" >> beam.CoGroupByKey()
            | "SplitKnown" >> beam.ParDo(MatchPreviousFn()).with_outputs(NEW, main=KNOWN)
        )
        fractions = (self._eval_fraction, self._test_fraction)
        known = matched[KNOWN] | "ResolveKnown" >> beam.ParDo(
            ResolveKnownFn(*fractions)
        ).with_outputs(ERRORS, transforms.DUPLICATES, main=KNOWN)
        # New images are decoded (validated) as a full run validates every image.
        validated = matched[NEW] | "ValidateNew" >> beam.ParDo(self._validate).with_outputs(
            ERRORS, main="ok"
        )
        new = (
            validated.ok
            | "GroupNewByContent" >> beam.GroupByKey()
            | "ResolveNew"
            >> beam.ParDo(transforms.ResolveDuplicatesFn(*fractions)).with_outputs(
                ERRORS, transforms.DUPLICATES, main="accepted"
            )
        )
        return {
            "accepted": new.accepted,
            KNOWN: known[KNOWN],
            transforms.DUPLICATES: (known[transforms.DUPLICATES], new[transforms.DUPLICATES])
            | "Duplicates" >> beam.Flatten(),
            ERRORS: (validated[ERRORS], known[ERRORS], new[ERRORS]) | "Errors" >> beam.Flatten(),
        }


class ShardRows(NamedTuple):
    """The accepted rows whose image the earlier dataset stores in ``shard``."""

    shard: str
    rows: list[transforms.Accepted]


class StoredReader:
    """:class:`ShardRows` -> the stored ``(Encoded, Embedded)`` pair of each row's image, read
    from the shard in one streaming pass, then each row without a usable record (its
    :class:`~pipeline.transforms.Accepted`, to encode and embed after all).

    ``EncodeFn`` calls it (``read_stored``) for each group, on its bundle thread: the pairs
    stream on through ``RunInference`` (which passes them through) to the writers.
    """

    def __init__(
        self,
        embedding_dim: int,
        views: manifest_lib.TrainViews | None = None,
        stored_views: manifest_lib.TrainViews | None = None,
    ):
        self._embedding_dim = embedding_dim
        self._views = views or manifest_lib.TrainViews()
        self._stored_views = stored_views or manifest_lib.TrainViews()
        self._progress = Progress("reused images")

    def __call__(self, group: ShardRows) -> Iterator:
        shard = group.shard
        wanted = {accepted.sha256: accepted for accepted in group.rows}
        count = 0
        try:
            for record in sinks.read_tfrecords(shard):
                if not wanted:
                    break
                count += 1
                try:
                    stored = parse_stored(record)
                except RECORD_ERRORS:
                    continue  # not indexed either
                accepted = wanted.get(stored.sha256)
                if accepted is None:
                    continue
                problem = stored_problem(stored, self._embedding_dim)
                if problem:
                    _LOGGER.warning(
                        "%s: %s: the stored record of %s is unusable (%s); embedding it again",
                        FLAG,
                        shard,
                        accepted.row.uri,
                        problem,
                    )
                    continue
                inference = stored_inference(
                    stored, accepted.split, self._embedding_dim, self._views, self._stored_views
                )
                if inference is None:
                    continue  # no views (or other views) stored: embedded again, with views
                del wanted[stored.sha256]
                self._progress.update()
                encoded = transforms.Encoded(
                    accepted, stored.height, stored.width, stored.jpeg, reused=True
                )
                yield encoded, Embedded(inference)
        except Exception as e:  # noqa: BLE001 - an unreadable input is reported, not fatal
            _LOGGER.warning(
                "%s: cannot read %s after %d records (%s); embedding its %d remaining images",
                FLAG,
                shard,
                count,
                exception_reason(e),
                len(wanted),
            )
        for accepted in wanted.values():
            counter("rows_reuse_fallback").inc()
            yield accepted


class GroupByShard(beam.PTransform):
    """``(shard, Accepted)`` pairs -> one :class:`ShardRows` per shard."""

    def expand(self, known):
        return (
            known
            | "Group" >> beam.GroupByKey()
            | "ShardRows" >> beam.MapTuple(lambda shard, rows: ShardRows(shard, list(rows)))
        )
