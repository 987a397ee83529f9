"""Scoring images with an exported hubflow model: the RunInference handler and batch prediction's DoFns.

The handler runs the export's serving signature (:mod:`schemas.serving`) on the raw image
bytes: the export's own decoding runs, there is no second copy of the preprocessing.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipeline import csv_rows, files, images, inference
from pipeline.records import SOURCE_CSV, Row, counter, reject
from schemas import errors, serving
from schemas import manifest as manifest_lib
from schemas.errors import ErrorRecord, exception_reason

PREDICTIONS_CSV_HEADER = "uri,label,score,top_k,true_label"


class _LoadedModel:
    """The loaded SavedModel and its signature (weak-referenceable for ``shared.Shared``)."""

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.module = tf.saved_model.load(model_dir)
        self.serve = self.module.signatures[serving.SIGNATURE_NAME]


class ServingSignatureModelHandler(ModelHandler[bytes, PredictionResult, _LoadedModel]):
    """Runs a hubflow export's serving signature on encoded image bytes.

    Each result's ``inference`` is ``{"label", "score", "top_k"}``, or the exception when the
    model rejected that image: a batch that fails is retried image by image, so one image the
    model cannot decode does not take its batch-mates down with it.
    """

    def __init__(
        self,
        model_dir: str,
        max_batch_size: int = 32,
        precision: str = manifest_lib.PRECISION_FLOAT32,
    ):
        super().__init__()
        self._model_dir = model_dir
        self._max_batch_size = max_batch_size
        self._precision = precision

    def load_model(self) -> _LoadedModel:
        if self._precision == manifest_lib.PRECISION_BFLOAT16:
            # Before loading: grappler rewrites the signature's graph when it first runs, and
            # the option is process-wide (a worker process runs one job's model).
            inference.enable_bfloat16()
        return _LoadedModel(self._model_dir)

    def _call(self, model: _LoadedModel, batch: Sequence[bytes]) -> list[dict[str, Any]]:
        import tensorflow as tf

        out = model.serve(**{serving.INPUT_KEY: tf.constant(list(batch), dtype=tf.string)})
        labels = out[serving.CLASSES].numpy()
        scores = out[serving.SCORES].numpy()
        top_labels = out[serving.TOP_K_CLASSES].numpy()
        top_scores = out[serving.TOP_K_SCORES].numpy()
        return [
            {
                "label": labels[i].decode("utf-8"),
                "score": float(scores[i]),
                "top_k": [
                    [label.decode("utf-8"), float(score)]
                    for label, score in zip(top_labels[i], top_scores[i], strict=True)
                ],
            }
            for i in range(len(batch))
        ]

    def run_inference(self, batch, model, inference_args=None) -> list[PredictionResult]:
        try:
            outputs: list[Any] = self._call(model, batch)
        except Exception:  # noqa: BLE001 - find the culprit(s) one by one
            outputs = []
            for example in batch:
                try:
                    outputs.append(self._call(model, [example])[0])
                except Exception as e:  # noqa: BLE001 - becomes this image's error record
                    outputs.append(e)
        return [PredictionResult(x, y) for x, y in zip(batch, outputs, strict=True)]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(x) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "hubflow_predict"

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed-size batches: the adaptive estimator settles on tiny batches when per-image
        # CPU work (decode, re-encode) competes with the model, and the model is fastest batched.
        return {"min_batch_size": self._max_batch_size, "max_batch_size": self._max_batch_size}


class ReadSourcesFn(beam.DoFn):
    """A CSV (labels optional) or a glob -> rows to score; bad CSV rows -> ``errors``."""

    def process(self, source: tuple[str, str]) -> Iterator:
        kind, value = source
        if kind == SOURCE_CSV:
            items = csv_rows.read_csv(value, require_label=False)
        else:
            items = (
                Row(value, 0, m.path, m.path, "", None)
                for result in FileSystems.match([value])
                for m in sorted(result.metadata_list, key=lambda m: m.path)
            )
        for item in items:
            if isinstance(item, ErrorRecord):
                yield reject(item)
            else:
                yield item


class ReadImageFn(beam.DoFn):
    """Row -> ``(row, JPEG bytes)`` normalised as preprocessing stored the training images.

    Every image goes through the pipeline's own image code (:func:`pipeline.images.reencode`):
    any format preprocessing accepts (WebP and TIFF included), EXIF orientation applied, CMYK,
    palette and 16-bit converted, the same size limits, then re-encoded as preprocessing stored
    it (``jpeg_quality``, ``max_image_side`` from the export's ``preprocessing.json``). So the
    model is sent exactly what the trainer saw. Others -> ``errors``.
    """

    def __init__(
        self,
        max_pixels: int,
        *,
        max_file_bytes: int = images.DEFAULT_MAX_FILE_BYTES,
        jpeg_quality: int = images.DEFAULT_JPEG_QUALITY,
        max_image_side: int | None = None,
    ):
        self._max_pixels = max_pixels
        self._max_file_bytes = files.check_max_bytes(max_file_bytes)
        self._quality = jpeg_quality
        self._max_side = max_image_side

    def process(self, row: Row) -> Iterator:
        data = files.read_row_image(row, self._max_file_bytes)  # regular files, size-capped
        if isinstance(data, ErrorRecord):
            yield reject(data)
            return
        try:
            encoded = images.reencode(
                data, max_pixels=self._max_pixels, max_side=self._max_side, quality=self._quality
            )
        except images.ImageError as e:
            yield reject(ErrorRecord.for_row(row, errors.STAGE_DECODE, e.category, str(e)))
            return
        yield row, encoded.jpeg


class ToPredictionFn(beam.DoFn):
    """``(row, PredictionResult)`` -> a prediction dict, or an error record."""

    def process(self, element: tuple[Row, PredictionResult]) -> Iterator:
        row, result = element
        if isinstance(result.inference, Exception):
            yield reject(
                ErrorRecord.for_row(
                    row,
                    errors.STAGE_PREDICT,
                    errors.MODEL_FAILED,
                    exception_reason(result.inference),
                )
            )
            return
        prediction = {"uri": row.uri, **result.inference}
        if row.label:
            prediction["true_label"] = row.label
        counter("images_predicted").inc()
        yield prediction


def prediction_csv_line(prediction: dict[str, Any]) -> str:
    buf = io.StringIO()
    top_k = ";".join(f"{label}:{score:.6f}" for label, score in prediction["top_k"])
    csv.writer(buf, lineterminator="").writerow(
        [
            prediction["uri"],
            prediction["label"],
            f"{prediction['score']:.6f}",
            top_k,
            prediction.get("true_label", ""),
        ]
    )
    return buf.getvalue()
