"""Batch prediction on Beam: ``python -m pipeline.predict`` / ``hubflow-predict``.

Scores images with an exported hubflow model (``export/<n>/``) through Beam RunInference over
its ``serving_default`` signature, on the raw image bytes: the export's own decoding runs, there
is no second copy of the preprocessing. Runs unchanged on the DirectRunner and on Dataflow.
Every input image ends as a prediction or as an error record; when the input CSV has labels the
job also writes ``metrics.json`` and ``confusion_matrix.png``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import logging
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import (
    KeyedModelHandler,
    ModelHandler,
    PredictionResult,
    RunInference,
)
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineResult

from pipeline import csv_rows, images, transforms
from pipeline.cli import Parser, UsageError, positive_int, unknown_flags
from pipeline.records import ErrorRecord, Row

_LOGGER = logging.getLogger(__name__)
PROG = "hubflow-predict"
PREDICTIONS_PREFIX = "predictions"
SUMMARY_FILE = "summary.json"
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
LABELS_EXTRA = os.path.join("assets.extra", "labels.txt")
# What tf.io.decode_image (the export's decoder) reads; other formats are rejected up front.
SERVABLE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "BMP"})
SOURCE_PATTERN = "pattern"


# ---------------------------------------------------------------------------------------------
# Model handler


class _LoadedModel:
    """The loaded SavedModel and its signature (weak-referenceable for ``shared.Shared``)."""

    def __init__(self, model_dir: str):
        import tensorflow as tf

        self.module = tf.saved_model.load(model_dir)
        self.serve = self.module.signatures["serving_default"]


class ServingSignatureModelHandler(ModelHandler[bytes, PredictionResult, _LoadedModel]):
    """Runs a hubflow export's ``serving_default`` on encoded image bytes.

    Each result's ``inference`` is ``{"label", "score", "top_k"}``, or the exception when the
    model rejected that image: a batch that fails is retried image by image, so one image the
    model cannot decode does not take its batch-mates down with it.
    """

    def __init__(self, model_dir: str, max_batch_size: int = 32):
        super().__init__()
        self._model_dir = model_dir
        self._max_batch_size = max_batch_size

    def load_model(self) -> _LoadedModel:
        return _LoadedModel(self._model_dir)

    def _call(self, model: _LoadedModel, batch: Sequence[bytes]) -> list[dict[str, Any]]:
        import tensorflow as tf

        out = model.serve(image_bytes=tf.constant(list(batch), dtype=tf.string))
        labels = out["classes"].numpy()
        scores = out["scores"].numpy()
        top_labels = out["top_k_classes"].numpy()
        top_scores = out["top_k_scores"].numpy()
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


# ---------------------------------------------------------------------------------------------
# DoFns


class ReadSourcesFn(beam.DoFn):
    """A CSV (labels optional) or a glob -> rows to score; bad CSV rows -> ``errors``."""

    def process(self, source: tuple[str, str]) -> Iterator:
        kind, value = source
        if kind == transforms.SOURCE_CSV:
            items = csv_rows.read_csv(value, require_label=False)
        else:
            items = (
                Row(value, 0, m.path, m.path, "", None)
                for result in FileSystems.match([value])
                for m in sorted(result.metadata_list, key=lambda m: m.path)
            )
        for item in items:
            if isinstance(item, ErrorRecord):
                yield transforms._rejected(item)
            else:
                yield item


class ReadImageFn(beam.DoFn):
    """Row -> ``(row, bytes)`` for images the export can decode; others -> ``errors``."""

    def __init__(self, max_pixels: int):
        self._max_pixels = max_pixels

    def process(self, row: Row) -> Iterator:
        try:
            data = transforms._read_image_bytes(row.uri)
        except Exception as e:  # noqa: BLE001
            yield transforms._rejected(
                ErrorRecord.for_row(row, "read", "unreadable", transforms._one_line(e))
            )
            return
        try:
            images.validate(data, self._max_pixels)
            fmt = images.image_format(data)
        except images.ImageError as e:
            yield transforms._rejected(ErrorRecord.for_row(row, "decode", e.category, str(e)))
            return
        if fmt not in SERVABLE_FORMATS:
            yield transforms._rejected(
                ErrorRecord.for_row(
                    row,
                    "decode",
                    "unsupported_format",
                    f"{fmt} images are not accepted by the exported model (JPEG, PNG, GIF, BMP)",
                )
            )
            return
        yield row, data


class ToPredictionFn(beam.DoFn):
    """``(row, PredictionResult)`` -> a prediction dict, or an error record."""

    def process(self, element: tuple[Row, PredictionResult]) -> Iterator:
        row, result = element
        if isinstance(result.inference, Exception):
            yield transforms._rejected(
                ErrorRecord.for_row(
                    row, "predict", "model_failed", transforms._one_line(result.inference)
                )
            )
            return
        prediction = {"uri": row.uri, **result.inference}
        if row.label:
            prediction["true_label"] = row.label
        beam.metrics.Metrics.counter(transforms.METRICS_NAMESPACE, "images_predicted").inc()
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


# ---------------------------------------------------------------------------------------------
# Summary and metrics


def summarize(
    predictions_count: int,
    errors_by_reason: dict[str, int],
    pairs: list[tuple[tuple[str, str], int]],
    labels: list[str],
) -> dict[str, Any]:
    """Counts and, for labeled rows, metrics over the scored rows whose label the model knows."""
    from training.evaluate import confusion_report

    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * len(labels) for _ in labels]
    unknown: dict[str, int] = {}
    labeled = 0
    for (true, predicted), n in pairs:
        labeled += n
        if true in index:
            matrix[index[true]][index[predicted]] += n
        else:
            unknown[true] = unknown.get(true, 0) + n
    errors = sum(errors_by_reason.values())
    summary: dict[str, Any] = {
        "images": predictions_count + errors,
        "predictions": predictions_count,
        "errors": errors,
        "errors_by_reason": dict(sorted(errors_by_reason.items())),
        "labeled_predictions": labeled,
        "unknown_label_predictions": sum(unknown.values()),
        "unknown_labels": dict(sorted(unknown.items())),
    }
    if labeled:
        summary["metrics"] = confusion_report(matrix, labels)
    return summary


class WriteSummaryFn(beam.DoFn):
    """Writes ``summary.json`` (and ``metrics.json`` + the confusion PNG for labeled input)."""

    def __init__(self, output_dir: str, labels: list[str], model_dir: str):
        self._output_dir = output_dir
        self._labels = labels
        self._model_dir = model_dir

    def process(self, predictions_count, errors_by_reason, pairs, written_files):
        summary = summarize(predictions_count, dict(errors_by_reason), pairs, self._labels)
        summary["model"] = self._model_dir
        metrics = summary.get("metrics")
        if metrics:
            _write(self._output_dir, METRICS_FILE, json.dumps(metrics, indent=2).encode())
            _write(self._output_dir, CONFUSION_PNG, _confusion_png(metrics, self._labels))
        _write(self._output_dir, SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        yield summary


def _confusion_png(metrics: dict, labels: list[str]) -> bytes:
    import tempfile

    from training.evaluate import plot_confusion_matrix

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFUSION_PNG)
        plot_confusion_matrix(path, metrics["confusion_matrix"], labels, "batch predictions")
        with open(path, "rb") as f:
            return f.read()


def _write(output_dir: str, name: str, data: bytes) -> None:
    with FileSystems.create(FileSystems.join(output_dir, name)) as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Command line and pipeline


@dataclasses.dataclass(frozen=True)
class PredictConfig:
    model_dir: str
    labels: list[str]
    sources: list[tuple[str, str]]
    output_dir: str
    batch_size: int
    max_image_pixels: int
    csv_output: bool


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", help="an export/<n>/ dir, or its parent (highest n) (required)")
    p.add_argument(
        "--input_csv",
        action="append",
        default=[],
        metavar="PATTERN",
        help="CSV(s) of image_uri[,label]; same rules as preprocessing",
    )
    p.add_argument(
        "--input_pattern",
        action="append",
        default=[],
        metavar="GLOB",
        help="image glob on any Beam filesystem, e.g. gs://bucket/new/*.jpg",
    )
    p.add_argument("--output_dir", help="where predictions, errors and metrics go (required)")
    p.add_argument("--batch_size", type=positive_int("--batch_size"), default=32)
    p.add_argument(
        "--format",
        choices=("jsonl", "csv"),
        default="jsonl",
        help="csv also writes predictions.csv (predictions-*.jsonl always)",
    )
    p.add_argument(
        "--max_image_pixels",
        type=positive_int("--max_image_pixels"),
        default=images.DEFAULT_MAX_PIXELS,
    )
    p.add_argument("--overwrite", action="store_true")
    return p


def resolve_model_dir(path: str) -> str:
    """``export/<n>`` itself, or the highest numbered version under it."""
    if FileSystems.exists(FileSystems.join(path, "saved_model.pb")):
        return path
    versions = []
    for result in FileSystems.match([FileSystems.join(path, "*", "saved_model.pb")]):
        for m in result.metadata_list:
            version = os.path.basename(os.path.dirname(m.path))
            if version.isdigit():
                versions.append((int(version), os.path.dirname(m.path)))
    if not versions:
        raise UsageError(f"--model: no SavedModel in {path} or its numbered sub-folders")
    return max(versions)[1]


def parse_config(argv: Sequence[str] | None = None) -> tuple[PredictConfig, list[str]]:
    args, beam_args = build_parser().parse_known_args(argv)
    unknown = unknown_flags(beam_args)
    if unknown:
        raise UsageError(f"unrecognized flag {unknown[0]} (see --help)")
    if not args.model:
        raise UsageError("--model is required")
    if not args.output_dir:
        raise UsageError("--output_dir is required")
    if not args.input_csv and not args.input_pattern:
        raise UsageError("give --input_csv or --input_pattern")
    model_dir = resolve_model_dir(
        args.model if "://" in args.model else os.path.abspath(args.model)
    )
    labels_path = FileSystems.join(model_dir, LABELS_EXTRA)
    if not FileSystems.exists(labels_path):
        raise UsageError(f"--model: {model_dir} is not a hubflow export ({LABELS_EXTRA} missing)")
    with FileSystems.open(labels_path) as f:
        labels = [x for x in f.read().decode("utf-8").splitlines() if x]
    try:
        csvs = csv_rows.resolve_csv_patterns(args.input_csv) if args.input_csv else []
    except ValueError as e:
        raise UsageError(str(e)) from None
    sources = [(transforms.SOURCE_CSV, c) for c in csvs]
    for pattern in args.input_pattern:
        pattern = pattern if "://" in pattern else os.path.abspath(pattern)
        if not any(r.metadata_list for r in FileSystems.match([pattern])):
            raise UsageError(f"--input_pattern: no file matches {pattern!r}")
        sources.append((SOURCE_PATTERN, pattern))
    output_dir = args.output_dir if "://" in args.output_dir else os.path.abspath(args.output_dir)
    summary = FileSystems.join(output_dir, SUMMARY_FILE)
    if FileSystems.exists(summary):
        if not args.overwrite:
            raise UsageError(f"--output_dir: {output_dir} already holds predictions; --overwrite")
        old = [
            m.path
            for r in FileSystems.match([FileSystems.join(output_dir, "*")])
            for m in r.metadata_list
        ]
        FileSystems.delete(old)
    return (
        PredictConfig(
            model_dir,
            labels,
            sources,
            output_dir,
            args.batch_size,
            args.max_image_pixels,
            args.format == "csv",
        ),
        beam_args,
    )


def build_pipeline(p: beam.Pipeline, config: PredictConfig) -> None:
    out = config.output_dir
    rows = (
        p
        | "Sources" >> beam.Create(config.sources)
        | "ReadSources" >> beam.ParDo(ReadSourcesFn()).with_outputs(transforms.ERRORS, main="rows")
    )
    read = (
        rows.rows
        | "Reshuffle" >> beam.Reshuffle()
        | "ReadImages"
        >> beam.ParDo(ReadImageFn(config.max_image_pixels)).with_outputs(
            transforms.ERRORS, main="ok"
        )
    )
    handler = KeyedModelHandler(ServingSignatureModelHandler(config.model_dir, config.batch_size))
    scored = (
        read.ok
        | "Predict" >> RunInference(handler)
        | "ToPrediction"
        >> beam.ParDo(ToPredictionFn()).with_outputs(transforms.ERRORS, main="predictions")
    )
    predictions = scored.predictions
    errors = (rows[transforms.ERRORS], read[transforms.ERRORS], scored[transforms.ERRORS]) | (
        "AllErrors" >> beam.Flatten()
    )
    files = [
        predictions
        | "PredictionsToJson" >> beam.Map(lambda x: json.dumps(x, ensure_ascii=False))
        | "WritePredictions"
        >> beam.io.WriteToText(
            FileSystems.join(out, PREDICTIONS_PREFIX), file_name_suffix=".jsonl"
        ),
        errors
        | "ErrorsToJson" >> beam.Map(transforms.error_to_json)
        | "WriteErrors"
        >> beam.io.WriteToText(FileSystems.join(out, "errors"), file_name_suffix=".jsonl"),
    ]
    if config.csv_output:
        files.append(
            predictions
            | "ToCsv" >> beam.Map(prediction_csv_line)
            | "WriteCsv"
            >> beam.io.WriteToText(
                FileSystems.join(out, f"{PREDICTIONS_PREFIX}.csv"),
                num_shards=1,
                shard_name_template="",
                header="uri,label,score,top_k,true_label",
            )
        )
    count = predictions | "CountPredictions" >> beam.combiners.Count.Globally()
    by_reason = (
        errors
        | "ErrorReasons" >> beam.Map(lambda e: e.category)
        | "CountReasons" >> beam.combiners.Count.PerElement()
        | "CollectReasons" >> beam.combiners.ToList()
    )
    pairs = (
        predictions
        | "Labeled" >> beam.Filter(lambda x: "true_label" in x)
        | "Pairs" >> beam.Map(lambda x: (x["true_label"], x["label"]))
        | "CountPairs" >> beam.combiners.Count.PerElement()
        | "CollectPairs" >> beam.combiners.ToList()
    )
    done = tuple(files) | "AllWritten" >> beam.Flatten()
    (
        count
        | "WriteSummary"
        >> beam.ParDo(
            WriteSummaryFn(out, config.labels, config.model_dir),
            errors_by_reason=beam.pvalue.AsSingleton(by_reason),
            pairs=beam.pvalue.AsSingleton(pairs),
            written_files=beam.pvalue.AsList(done),
        )
    )


def run_config(config: PredictConfig, beam_args, test_pipeline=None) -> PipelineResult:
    p = test_pipeline or beam.Pipeline(options=PipelineOptions(list(beam_args)))
    build_pipeline(p, config)
    result = p.run()
    result.wait_until_finish()
    return result


def run(argv: Sequence[str] | None = None, test_pipeline=None) -> PipelineResult:
    """Validates the flags, builds the job and runs it to completion."""
    config, beam_args = parse_config(argv)
    return run_config(config, beam_args, test_pipeline)


def read_summary(output_dir: str) -> dict[str, Any]:
    with FileSystems.open(FileSystems.join(output_dir, SUMMARY_FILE)) as f:
        return json.loads(f.read())


def format_summary(summary: dict[str, Any]) -> str:
    lines = [
        f"images {summary['images']} = predictions {summary['predictions']} "
        f"+ errors {summary['errors']}"
    ]
    for reason, n in summary["errors_by_reason"].items():
        lines.append(f"  error {reason}: {n}")
    metrics = summary.get("metrics")
    if metrics:
        lines.append(
            f"accuracy {metrics['accuracy']:.4f} on {metrics['examples']} labeled images"
            + (
                f" ({summary['unknown_label_predictions']} more with labels the model does not "
                f"know: {', '.join(summary['unknown_labels'])})"
                if summary["unknown_label_predictions"]
                else ""
            )
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pipeline").setLevel(logging.INFO)
    try:
        config, beam_args = parse_config(argv)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    run_config(config, beam_args)
    summary = read_summary(config.output_dir)
    print(format_summary(summary))
    print(f"output: {config.output_dir}")
    return 0 if summary["predictions"] else 1


if __name__ == "__main__":
    sys.exit(main())
