"""What batch prediction writes beside its predictions, and the summary its CLI prints.

``summary.json`` counts every input image as a prediction or an error; for labeled input the
job also writes ``metrics.json`` and ``confusion_matrix.png`` (:mod:`evaluation`).
"""

from __future__ import annotations

import json
from typing import Any

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from evaluation.metrics import confusion_report
from pipeline import files
from schemas import manifest as manifest_lib
from storage.fileops import basename
from storage.staging import temp_folders

PREDICTIONS_PREFIX = "predictions"
PREDICTIONS_SUFFIX = ".jsonl"
PREDICTIONS_CSV = "predictions.csv"
SUMMARY_FILE = "summary.json"  # written last: its presence says the predictions are complete
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"


def output_paths(directory: str) -> list[str]:
    """The prediction outputs present in ``directory``: exactly what this job writes."""
    patterns = [
        f"{PREDICTIONS_PREFIX}-*{PREDICTIONS_SUFFIX}",
        f"{manifest_lib.ERRORS_PREFIX}-*{manifest_lib.ERRORS_SUFFIX}",
        PREDICTIONS_CSV,
        SUMMARY_FILE,
        METRICS_FILE,
        CONFUSION_PNG,
    ]
    return files.match_paths([FileSystems.join(directory, p) for p in patterns])


def output_names(directory: str) -> list[str]:
    """:func:`output_paths` relative to ``directory``."""
    return [basename(path) for path in output_paths(directory)]


def existing_outputs(output_dir: str) -> list[str]:
    """Earlier predictions in ``output_dir`` and their writers' temp files: all ``--overwrite``
    may delete. The user's other files there (the input CSV, notes, images) are never listed."""
    return output_paths(output_dir) + temp_folders(output_dir)


def summarize(
    predictions_count: int,
    errors_by_reason: dict[str, int],
    pairs: list[tuple[tuple[str, str], int]],
    labels: list[str],
) -> dict[str, Any]:
    """Counts and, for labeled rows, metrics over the scored rows whose label the model knows."""
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

    def __init__(self, output_dir: str, labels: list[str], model_dir: str, precision: str):
        self._output_dir = output_dir
        self._labels = labels
        self._model_dir = model_dir
        self._precision = precision

    def process(self, predictions_count, errors_by_reason, pairs, written_files):
        summary = summarize(predictions_count, dict(errors_by_reason), pairs, self._labels)
        summary["model"] = self._model_dir
        summary["precision"] = self._precision
        metrics = summary.get("metrics")
        if metrics:
            _write(self._output_dir, METRICS_FILE, json.dumps(metrics, indent=2).encode())
            _write(self._output_dir, CONFUSION_PNG, _confusion_png(metrics, self._labels))
        _write(self._output_dir, SUMMARY_FILE, json.dumps(summary, indent=2).encode())
        yield summary


def _confusion_png(metrics: dict, labels: list[str]) -> bytes:
    from evaluation.plots import confusion_matrix_png

    return confusion_matrix_png(metrics["confusion_matrix"], labels, "batch predictions")


def _write(output_dir: str, name: str, data: bytes) -> None:
    with FileSystems.create(FileSystems.join(output_dir, name)) as f:
        f.write(data)


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
