"""DoFns and composite PTransforms of the preprocessing job.

The job runs in three passes so that nothing image-sized is ever held for a global step:

1. ``ReadRows``: label CSVs / image dirs -> rows (parse errors to the dead letter), reshuffled
   so the image work spreads over workers.
2. ``HashAndValidate`` + ``ResolveDuplicates``: read each image once to hash and decode it (a
   JPEG at 1/8 scale), then group rows by content hash: duplicates are counted, conflicting labels
   rejected, and the split is fixed from the hash. Only small row records cross this shuffle.
3. ``EncodeAndEmbed``: read the unique images again, re-encode them as JPEG and embed the
   re-encoded pixels with RunInference; examples stream straight into the TFRecord writers.

Rows with a blank label (unlabeled images) take the same three passes and are written to the
``unlabeled`` split (``schemas.csv_format.UNLABELED``) with label ``features.UNLABELED_INDEX``;
they never enter the label vocabulary or the embedding statistics.

An incremental run (``--reuse_from``, :mod:`pipeline.reuse`) checks only the headers in pass 2,
joins the hashes with an earlier dataset's, fully validates only the images that are new, and
takes the stored JPEG and embedding of the others in pass 3 instead of re-encoding and embedding
them (``Encoded.reused``).

Per-image work (read, hash, decode, re-encode, resize) runs on a small thread pool inside its
DoFn (:mod:`pipeline.parallel`), so on a CPU worker it overlaps the model instead of taking
turns with it.

The label vocabulary is known after pass 2, so pass 3 never waits on a global result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import KeyedModelHandler, PredictionResult, RunInference
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue

from pipeline import csv_rows, files, images
from pipeline.inference import ImageEmbeddingModelHandler, PassEmbeddedModelHandler
from pipeline.parallel import ThreadedDoFn
from pipeline.progress import Progress
from pipeline.records import ERRORS, SOURCE_CSV, SOURCE_IMAGE_DIR, Row, counter, reject
from pipeline.views import ViewsModelHandler, reencode_with_views
from schemas import csv_format, errors, features
from schemas.backbones import CROP_SQUASH, BackboneSpec
from schemas.errors import ErrorRecord, exception_reason
from schemas.manifest import TrainViews

_LOGGER = logging.getLogger(__name__)

DUPLICATES = "duplicates"
WRITTEN = "written"  # (split, label) per written record; label "" in the unlabeled split
REUSED = "reused"  # the split of each written record whose JPEG and embedding were stored before
EMBEDDINGS = "embeddings"  # the labeled records' embeddings: tf.Transform's statistics


class Accepted(NamedTuple):
    """A row whose image is readable, decodable and unique, with its split decided."""

    sha256: str
    row: Row
    split: str


class Encoded(NamedTuple):
    """A re-encoded image: the key that carries it through RunInference to its example.

    ``reused``: the JPEG (and its embedding) were taken from an earlier dataset
    (:mod:`pipeline.reuse`), not made by this run.
    """

    accepted: Accepted
    height: int
    width: int
    jpeg: bytes
    reused: bool = False


def assign_split(sha256: str, eval_fraction: float, test_fraction: float) -> str:
    """Deterministic split from a content hash: identical bytes always land in the same split."""
    bucket = int(sha256[:16], 16) / float(1 << 64)
    if bucket < test_fraction:
        return csv_format.TEST
    if bucket < test_fraction + eval_fraction:
        return csv_format.EVAL
    return csv_format.TRAIN


class ParseRowsFn(beam.DoFn):
    """Parses one label CSV or lists one image dir into rows; bad rows go to ``errors``."""

    def __init__(self, label_dict: list[str] | None = None):
        self._label_dict = label_dict
        self._known: frozenset[str] | None = None
        self._read = counter("rows_read")

    def setup(self):
        self._known = frozenset(self._label_dict) if self._label_dict is not None else None

    def process(self, source: tuple[str, str]) -> Iterator:
        kind, path = source
        try:
            items = list(
                csv_rows.read_csv(path) if kind == SOURCE_CSV else files.list_image_dir(path)
            )
        except Exception as e:  # noqa: BLE001 - the source vanished after launch: report it
            reason = f"cannot read: {exception_reason(e)}"
            items = [ErrorRecord(path, 0, "", "", errors.STAGE_PARSE, reason, errors.UNREADABLE)]
        for item in items:
            self._read.inc()
            if isinstance(item, ErrorRecord):
                yield reject(item)
            elif problem := csv_rows.label_problem(item.label):  # a class folder's name
                yield reject(ErrorRecord.for_row(item, errors.STAGE_PARSE, errors.BAD_ROW, problem))
            elif self._known is not None and item.label and item.label not in self._known:
                yield reject(
                    ErrorRecord.for_row(
                        item,
                        errors.STAGE_PARSE,
                        errors.UNKNOWN_LABEL,
                        f"label {item.label!r} is not in --label_dict",
                    )
                )
            else:
                yield item


class ReadRows(beam.PTransform):
    """Label CSVs and/or image dirs -> reshuffled :class:`Row` s (+ ``errors``)."""

    def __init__(self, csv_paths: list[str], image_dirs: list[str], label_dict=None):
        super().__init__()
        self._sources = [(SOURCE_CSV, p) for p in csv_paths] + [
            (SOURCE_IMAGE_DIR, d) for d in image_dirs
        ]
        self._label_dict = label_dict

    def expand(self, pbegin):
        parsed = (
            pbegin
            | "Sources" >> beam.Create(self._sources)
            | "Parse" >> beam.ParDo(ParseRowsFn(self._label_dict)).with_outputs(ERRORS, main="rows")
        )
        # A small CSV fans out to heavy image reads: break fusion so they spread over workers.
        rows = parsed.rows | "Reshuffle" >> beam.Reshuffle()
        return rows, parsed[ERRORS]


class HashAndValidateFn(ThreadedDoFn):
    """Reads a row's image, hashes it and checks that it decodes: ``(sha256, row)``.

    Reading, hashing and decoding run on a thread pool (:class:`~pipeline.parallel.ThreadedDoFn`).
    With ``decode=False`` only the header is checked (see :func:`hash_and_validate`).
    """

    def __init__(
        self,
        max_pixels: int,
        threads: int | None = None,
        *,
        max_file_bytes: int = images.DEFAULT_MAX_FILE_BYTES,
        decode: bool = True,
    ):
        super().__init__(threads)
        self._max_pixels = max_pixels
        self._max_file_bytes = files.check_max_bytes(max_file_bytes)
        self._decode = decode
        self._progress = Progress("checked images")
        self._total: int | None = None

    def process(
        self,
        row: Row,
        window=beam.DoFn.WindowParam,
        timestamp=beam.DoFn.TimestampParam,
        total: int | None = None,
    ) -> Iterator:
        self._total = total
        yield from super().process(row, window, timestamp)

    def work(self, row: Row) -> str | ErrorRecord:
        return hash_and_validate(
            row, self._max_pixels, max_file_bytes=self._max_file_bytes, decode=self._decode
        )

    def emit(self, row: Row, result: str | ErrorRecord) -> Iterator:
        self._progress.update(total=self._total)
        if isinstance(result, ErrorRecord):
            yield reject(result)
        else:
            yield result, row


def hash_and_validate(
    row: Row,
    max_pixels: int,
    *,
    max_file_bytes: int = images.DEFAULT_MAX_FILE_BYTES,
    decode: bool = True,
) -> str | ErrorRecord:
    """The sha256 hex digest of a row's image, or why the row is rejected.

    Only a regular file of at most ``max_file_bytes`` bytes is read (see ``files``). With
    ``decode=False`` only the header is checked (format, pixel limit, pixel mode: every check of
    :func:`images.validate` but the decode), for bytes already known to decode.
    """
    data = files.read_row_image(row, max_file_bytes)
    if isinstance(data, ErrorRecord):
        return data
    try:
        if decode:
            images.validate(data, max_pixels)
        else:
            images.image_format(data, max_pixels)
    except images.ImageError as e:
        return ErrorRecord.for_row(row, errors.STAGE_DECODE, e.category, str(e))
    return images.sha256_hex(data)


class ResolveDuplicatesFn(beam.DoFn):
    """One group of rows with identical image bytes -> one :class:`Accepted` row.

    Same label everywhere: the first row (by source, line) is kept, the rest are ``duplicates``.
    Different labels: every row of the group is rejected as ``conflicting_labels``.
    Unlabeled rows (blank label) give way to a labeled row: with one, they are ``duplicates`` of
    it; with conflicting labels, they are rejected with the group (the content is in dispute).
    A group of unlabeled rows only keeps its first row, in the unlabeled split.
    """

    def __init__(self, eval_fraction: float, test_fraction: float):
        self._eval_fraction = eval_fraction
        self._test_fraction = test_fraction

    def process(self, element: tuple[str, Iterable[Row]]) -> Iterator:
        sha256, group = element
        rows = sorted(group, key=lambda r: (r.source, r.line, r.uri))
        labeled = [r for r in rows if not r.unlabeled]
        if len({r.label for r in labeled}) > 1:
            for row in rows:
                others = [
                    f"{r.label!r} ({r.source}:{r.line})" for r in labeled if r.label != row.label
                ]
                reason = (
                    f"conflicting labels: the same image content (sha256 {sha256[:12]}) is also "
                    f"labeled {', '.join(others[:5])}{' …' if len(others) > 5 else ''}; "
                    "none of these rows is written"
                )
                yield reject(
                    ErrorRecord.for_row(row, errors.STAGE_DEDUPE, errors.CONFLICTING_LABELS, reason)
                )
            return
        kept = labeled[0] if labeled else rows[0]
        for row in rows:
            if row is not kept:
                counter("rows_duplicate").inc()
                yield TaggedOutput(DUPLICATES, row)
        if kept.unlabeled:
            split = csv_format.UNLABELED
        else:
            split = next((r.split for r in labeled if r.split), None) or assign_split(
                sha256, self._eval_fraction, self._test_fraction
            )
        yield Accepted(sha256, kept, split)


class EncodeFn(ThreadedDoFn):
    """Reads an accepted image again, re-encodes it and prepares the backbone's pixels.

    Outputs ``(Encoded, pixels)``: the pixels are the stored image (upright, downscaled as
    stored) before JPEG compression, framed into the backbone's input size
    as ``crop_fraction`` says (:func:`pipeline.images.backbone_pixels`). The work runs on a thread pool, overlapping the
    model. With ``views`` (``--train_views`` > 0) a train image's pixels are its centre and its
    augmented views, ``[1 + K, S, S, 3]`` (:mod:`pipeline.views`).

    With ``read_stored`` (an incremental run, :class:`pipeline.reuse.StoredReader`), an element
    that is not an :class:`Accepted` row is handed to it, on the bundle thread: it yields
    ``(Encoded, inference.Embedded)`` pairs of images an earlier dataset stores, output as they
    are, and the rows whose record turned out unusable, encoded as any other.
    """

    def __init__(
        self,
        image_size: int,
        max_pixels: int,
        max_side: int | None,
        quality: int,
        threads: int | None = None,
        max_in_flight: int | None = None,
        *,
        max_file_bytes: int = images.DEFAULT_MAX_FILE_BYTES,
        views: TrainViews | None = None,
        read_stored: Callable[[Any], Iterable] | None = None,
        crop_fraction: float = CROP_SQUASH,
    ):
        super().__init__(threads, max_in_flight)
        self._crop_fraction = crop_fraction
        self._read_stored = read_stored
        self._views = views if views is not None and views.count > 0 else None
        self._image_size = image_size
        self._max_pixels = max_pixels
        self._max_side = max_side
        self._quality = quality
        self._max_file_bytes = files.check_max_bytes(max_file_bytes)

    def process(
        self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam
    ) -> Iterator:
        if self._read_stored is None or isinstance(element, Accepted):
            yield from super().process(element, window, timestamp)
            return
        for out in self._read_stored(element):
            if isinstance(out, Accepted):  # no usable stored record: encoded after all
                yield from super().process(out, window, timestamp)
            else:
                yield WindowedValue(out, timestamp, (window,))

    def work(self, accepted: Accepted) -> tuple[Encoded, np.ndarray] | ErrorRecord:
        row = accepted.row
        data = files.read_row_image(row, self._max_file_bytes)
        if isinstance(data, ErrorRecord):
            return data
        if images.sha256_hex(data) != accepted.sha256:
            return ErrorRecord.for_row(
                row,
                errors.STAGE_READ,
                errors.FILE_CHANGED,
                "the file changed while the job was running",
            )
        options = {
            "max_pixels": self._max_pixels,
            "max_side": self._max_side,
            "quality": self._quality,
            "backbone_size": self._image_size,
            "crop_fraction": self._crop_fraction,
        }
        try:
            if self._views is not None and accepted.split == csv_format.TRAIN:
                encoded, pixels = reencode_with_views(data, accepted.sha256, self._views, **options)
            else:
                encoded = images.reencode(data, **options)
                pixels = encoded.backbone_pixels
        except images.ImageError as e:
            return ErrorRecord.for_row(row, errors.STAGE_DECODE, e.category, str(e))
        key = Encoded(accepted, encoded.height, encoded.width, encoded.jpeg)
        return key, pixels

    def emit(self, accepted: Accepted, result) -> Iterator:
        if isinstance(result, ErrorRecord):
            yield reject(result)
        else:
            yield result


class ToExampleFn(beam.DoFn):
    """Embedded image -> serialized TFExample, tagged with its split.

    An unlabeled image's example has label ``features.UNLABELED_INDEX`` and an empty label text;
    its embedding is not among the ``EMBEDDINGS`` (the statistics come from labeled records).
    A reused image (``Encoded.reused``) is also counted on the ``REUSED`` output.
    An inference of ``[1 + K, D]`` is a train image's centre and its ``--train_views``: the
    record stores the views (``features.EMBEDDING_VIEWS``); ``EMBEDDINGS`` gets the centre only,
    so the statistics (the head's normalisation) do not depend on the views.
    """

    def __init__(self):
        self._index: dict[str, int] | None = None
        self._progress = Progress("embedded images")

    def process(
        self,
        element: tuple[Encoded, PredictionResult],
        labels: list[str],
        total: int | None = None,
    ) -> Iterator:
        if self._index is None:
            self._index = {label: i for i, label in enumerate(labels)}
        encoded, result = element
        accepted = encoded.accepted
        row = accepted.row
        embedding = np.asarray(result.inference, dtype=np.float32)
        train_views = None
        if embedding.ndim == 2:
            embedding, train_views = embedding[0], embedding[1:]
        if not np.all(np.isfinite(embedding)) or (
            train_views is not None and not np.all(np.isfinite(train_views))
        ):
            yield reject(
                ErrorRecord.for_row(
                    row,
                    errors.STAGE_EMBED,
                    errors.EMBED_FAILED,
                    "the backbone returned non-finite features",
                )
            )
            return
        self._progress.update(total=total)
        unlabeled = accepted.split == csv_format.UNLABELED
        example = features.make_example(
            jpeg=encoded.jpeg,
            height=encoded.height,
            width=encoded.width,
            source=row.uri,
            sha256=accepted.sha256,
            label=features.UNLABELED_INDEX if unlabeled else self._index[row.label],
            label_text=row.label,
            embedding=embedding,
            views=train_views,
        )
        counter("rows_written").inc()
        # deterministic=True: protobuf otherwise writes the feature map in a per-process order,
        # so two runs on the same images wrote different bytes for the same record.
        yield TaggedOutput(accepted.split, example.SerializeToString(deterministic=True))
        yield TaggedOutput(WRITTEN, (accepted.split, row.label))
        if encoded.reused:
            counter("rows_reused").inc()
            yield TaggedOutput(REUSED, accepted.split)
        if not unlabeled:
            yield TaggedOutput(EMBEDDINGS, embedding)


def _failed_batch_errors(element) -> Iterator[ErrorRecord]:
    batch, exception = element
    for key, _ in batch:
        counter(f"rows_rejected_{errors.EMBED_FAILED}").inc()
        yield ErrorRecord.for_row(
            key.accepted.row,
            errors.STAGE_EMBED,
            errors.EMBED_FAILED,
            f"backbone failed: {exception_reason(exception)}",
        )


def encode_in_flight(batch_size: int) -> int:
    """How many images ``Encode`` keeps queued or in work: enough to keep the pool busy while
    the model runs a whole batch, few enough to bound memory."""
    return 2 * batch_size + 16


class EncodeAndEmbed(beam.PTransform):
    """Accepted rows -> per-split serialized examples (``csv_format.ALL_SPLITS``), ``written``
    (and ``reused``) events, the labeled records' raw embeddings.

    The input is the accepted rows. In an incremental run (``read_stored``, see
    :class:`EncodeFn`) it also holds the groups of rows whose images an earlier dataset stores:
    their stored JPEGs and embeddings pass through ``RunInference`` unchanged
    (:class:`~pipeline.inference.PassEmbeddedModelHandler`), so every image streams through one
    chain of fused steps to the writers.
    """

    def __init__(
        self,
        spec: BackboneSpec,
        batch_size: int,
        max_pixels: int,
        max_side: int | None,
        quality: int,
        labels,
        total,
        *,
        max_file_bytes: int = images.DEFAULT_MAX_FILE_BYTES,
        runtime=None,  # backbones.tflite_runtime.EmbeddingRuntime; None: TensorFlow
        views: TrainViews | None = None,
        read_stored: Callable[[Any], Iterable] | None = None,
        crop_fraction: float = CROP_SQUASH,
    ):
        super().__init__()
        self._spec = spec
        self._batch_size = batch_size
        self._runtime = runtime
        self._views = views.count if views is not None else 0
        self._encode = EncodeFn(
            spec.image_size,
            max_pixels,
            max_side,
            quality,
            max_in_flight=encode_in_flight(batch_size),
            max_file_bytes=max_file_bytes,
            views=views,
            read_stored=read_stored,
            crop_fraction=crop_fraction,
        )
        self._passes_embedded = read_stored is not None
        self._labels = labels
        self._total = total

    def expand(self, accepted):
        # The labels and the accepted count (side inputs of ToExample) are computed from
        # `accepted`: without this break the runner would fuse Encode with the step producing
        # `accepted` and have to hold every embedded image until those side inputs are ready.
        # With it, only the small row records are materialized and images stream to the writers.
        encoded = (
            accepted
            | "Materialize" >> beam.Reshuffle()
            | "Encode" >> beam.ParDo(self._encode).with_outputs(ERRORS, main="ok")
        )
        handler = ImageEmbeddingModelHandler(self._spec, self._batch_size, self._runtime)
        if self._views:  # train images come with their views, embedded in the same batches
            handler = ViewsModelHandler(handler, self._views)
        if self._passes_embedded:
            handler = PassEmbeddedModelHandler(handler)
        handler = KeyedModelHandler(handler)
        embedded, failed = encoded.ok | "Embed" >> RunInference(handler).with_exception_handling()
        embed_errors = failed.failed_inferences | "FailedBatches" >> beam.FlatMap(
            _failed_batch_errors
        )
        out = embedded | "ToExample" >> beam.ParDo(
            ToExampleFn(),
            labels=beam.pvalue.AsSingleton(self._labels),
            total=beam.pvalue.AsSingleton(self._total),
        ).with_outputs(ERRORS, WRITTEN, REUSED, EMBEDDINGS, *csv_format.ALL_SPLITS)
        errors = (encoded[ERRORS], embed_errors, out[ERRORS]) | "EmbedErrors" >> beam.Flatten()
        return out, errors
