"""Metrics of a classifier, computed from (true label, predicted probabilities) pairs.

Accuracy, top-k accuracy, cross-entropy, per-class precision/recall/F1, the confusion matrix,
the JSON metrics file and the text table the CLIs print. numpy only: it never imports
TensorFlow, so it can be used (and tested) on outputs saved from any run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from schemas.serving import MAX_TOP_K

_LOGGER = logging.getLogger(__name__)

# Probabilities are clipped to [EPSILON, 1] before the log, as Keras does.
EPSILON = 1e-7
DEFAULT_MAX_K = MAX_TOP_K  # the serving contract's top-k


def _validate_inputs(
    y_true: np.ndarray, probabilities: np.ndarray, labels: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Checks shapes and values; returns (int64 [N] labels, float64 [N, C] probabilities)."""
    labels = list(labels)
    num_classes = len(labels)
    if num_classes == 0:
        raise ValueError("labels is empty; pass the class names in label-index order.")
    if len(set(labels)) != num_classes:
        raise ValueError(f"labels has duplicates ({labels}); each class name must be unique.")
    y = np.asarray(y_true)
    probs = np.asarray(probabilities, dtype=np.float64)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D label indices [N], got shape {y.shape}.")
    if probs.ndim == 1 and probs.size == 0:
        probs = probs.reshape(0, num_classes)
    if probs.ndim != 2 or probs.shape[1] != num_classes:
        raise ValueError(
            f"probabilities must have shape [N, {num_classes}] (one column per label), "
            f"got {probs.shape}."
        )
    if probs.shape[0] != y.shape[0]:
        raise ValueError(
            f"y_true has {y.shape[0]} examples but probabilities has {probs.shape[0]} rows."
        )
    if y.size and not np.issubdtype(y.dtype, np.integer):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y))):
            raise ValueError(f"y_true must hold integer label indices, got dtype {y.dtype}.")
    y = y.astype(np.int64)
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(
            f"y_true holds label indices outside [0, {num_classes}): "
            f"min {y.min()}, max {y.max()}. Check that labels matches the training label order."
        )
    if not np.all(np.isfinite(probs)):
        raise ValueError("probabilities contains NaN or infinite values.")
    return y, probs


def safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """Element-wise numerator / denominator, 0.0 where the denominator is 0."""
    out = np.zeros(numerator.shape, dtype=np.float64)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs.

    Args:
        y_true: int [N] true label indices in ``[0, num_classes)``.
        y_pred: int [N] predicted label indices in ``[0, num_classes)``.
        num_classes: C.

    Returns:
        int64 [C, C]; row = true label, column = predicted label.
    """
    matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(matrix, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return matrix


def classification_report(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    labels: Sequence[str],
    k: int | None = None,
) -> dict[str, Any]:
    """Metrics for one split, as a JSON-serialisable dict of plain Python types.

    The predicted class is ``argmax`` of each row (the first class on ties). An example counts
    towards top-k accuracy when fewer than ``k`` classes have a strictly higher probability than
    its true class, i.e. classes tied at the boundary are all "in the top k", as in
    ``tf.math.in_top_k``. Precision, recall and F1 are 0.0 wherever they are undefined (a class
    never predicted, or with no examples); ``macro_f1`` is the unweighted mean over all labels.

    With no examples (N == 0) there is nothing to average: ``accuracy``, ``top_k_accuracy``,
    ``loss`` and ``macro_f1`` are ``None`` (JSON ``null``), every class has support 0 and
    precision/recall/F1 0.0, and the confusion matrix is all zeros.

    Args:
        y_true: int [N] true label indices into ``labels``.
        probabilities: float [N, C] predicted class probabilities (rows normally sum to 1; they
            are not renormalised).
        labels: the C class names in label-index order.
        k: for top-k accuracy; defaults to ``min(5, C)``. Must be in ``[1, C]``.

    Returns:
        ``{"examples", "accuracy", "top_k_accuracy", "k", "loss", "per_class", "macro_f1",
        "confusion_matrix", "labels"}`` where ``per_class`` maps each label, in order, to
        ``{"precision", "recall", "f1", "support"}`` and ``confusion_matrix`` is a C x C list of
        lists of ints (rows = true label, columns = predicted label). ``loss`` is the mean
        categorical cross-entropy (natural log) with probabilities clipped to ``[1e-7, 1]``.

    Raises:
        ValueError: if the shapes disagree with ``labels``, a label index is out of range, the
            probabilities are not finite, or ``k`` is outside ``[1, C]``.
    """
    labels = [str(label) for label in labels]
    y, probs = _validate_inputs(y_true, probabilities, labels)
    num_examples, num_classes = probs.shape
    if k is None:
        k = min(DEFAULT_MAX_K, num_classes)
    if not 1 <= k <= num_classes:
        raise ValueError(f"k must be between 1 and the number of classes ({num_classes}), got {k}.")

    y_pred = np.argmax(probs, axis=1) if num_examples else np.zeros(0, np.int64)
    report = confusion_report(confusion_matrix(y, y_pred, num_classes), labels)
    top_k_accuracy = loss = None
    if num_examples:
        true_probs = probs[np.arange(num_examples), y]
        higher = np.sum(probs > true_probs[:, None], axis=1)
        top_k_accuracy = float(np.mean(higher < k))
        loss = float(-np.mean(np.log(np.clip(true_probs, EPSILON, 1.0))))
    else:
        _LOGGER.warning("classification_report called with no examples; averages are None.")
    return {
        "examples": report["examples"],
        "accuracy": report["accuracy"],
        "top_k_accuracy": top_k_accuracy,
        "k": int(k),
        "loss": loss,
        "per_class": report["per_class"],
        "macro_f1": report["macro_f1"],
        "confusion_matrix": report["confusion_matrix"],
        "labels": report["labels"],
    }


def confusion_report(matrix: Any, labels: Sequence[str]) -> dict[str, Any]:
    """Accuracy, per-class precision/recall/F1/support and macro F1 from a confusion matrix.

    Args:
        matrix: C x C counts, rows = true label, columns = predicted label, in ``labels`` order.
        labels: the C class names.

    Returns:
        ``{"examples", "accuracy", "per_class", "macro_f1", "confusion_matrix", "labels"}``
        with ``None`` averages when the matrix is empty (see :func:`classification_report`).
    """
    labels = [str(label) for label in labels]
    matrix = np.asarray(matrix, dtype=np.int64)
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(
            f"confusion matrix shape {matrix.shape} does not match {len(labels)} labels"
        )
    true_positives = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    predicted = matrix.sum(axis=0)
    precision = safe_divide(true_positives, predicted.astype(np.float64))
    recall = safe_divide(true_positives, support.astype(np.float64))
    f1 = safe_divide(2.0 * precision * recall, precision + recall)
    total = int(matrix.sum())
    per_class = {
        label: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, label in enumerate(labels)
    }
    return {
        "examples": total,
        "accuracy": float(true_positives.sum() / total) if total else None,
        "per_class": per_class,
        "macro_f1": float(np.mean(f1)) if total else None,
        "confusion_matrix": matrix.tolist(),
        "labels": labels,
    }


def _json_default(value: Any) -> Any:
    """Lets numpy scalars and arrays that reach ``write_metrics`` serialise as plain JSON."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def metrics_text(reports: Mapping[str, Mapping[str, Any]]) -> str:
    """``{"eval": report, "test": report, ...}`` as the indented JSON of :func:`write_metrics`.

    For a writer that is not a local file (the trainer writes it with ``tf.io.gfile``).
    """
    return json.dumps(dict(reports), indent=2, default=_json_default, allow_nan=False) + "\n"


def write_metrics(path: str, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes ``{"eval": report, "test": report, ...}`` to ``path`` as indented JSON.

    Args:
        path: a local file path; missing parent directories are created.
        reports: split name -> report from :func:`classification_report`.

    Raises:
        ValueError: if ``path`` is a remote URL (``gs://`` etc.); write :func:`metrics_text` there.
    """
    if "://" in path:
        raise ValueError(
            f"write_metrics writes local files only, got {path!r}; write metrics_text(reports) "
            "to remote storage (e.g. with tf.io.gfile.GFile in the trainer)."
        )
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = metrics_text(reports)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    _LOGGER.info("Wrote metrics for %s to %s", ", ".join(reports) or "no splits", path)


def _fmt(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def format_report_table(report: Mapping[str, Any]) -> str:
    """A short text table of a report for the CLI summary.

    Args:
        report: a dict from :func:`classification_report`.

    Returns:
        Lines for examples, accuracy, top-k accuracy, loss and macro F1, then a header and one
        aligned row per class (precision, recall, F1, support), without a trailing newline.
    """
    summary = [
        ("examples", str(report["examples"])),
        ("accuracy", _fmt(report["accuracy"])),
        (f"top-{report['k']} accuracy", _fmt(report["top_k_accuracy"])),
        ("loss", _fmt(report["loss"])),
        ("macro F1", _fmt(report["macro_f1"])),
    ]
    key_width = max(len(key) for key, _ in summary)
    lines = [f"{key:<{key_width}}  {value}" for key, value in summary]

    per_class = report["per_class"]
    name_width = max([len("class"), *(len(label) for label in per_class)])
    support_width = max([len("support"), *(len(str(m["support"])) for m in per_class.values())])
    lines.append("")
    lines.append(
        f"{'class':<{name_width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  "
        f"{'support':>{support_width}}"
    )
    for label, metrics in per_class.items():
        lines.append(
            f"{label:<{name_width}}  {_fmt(metrics['precision']):>9}  "
            f"{_fmt(metrics['recall']):>9}  {_fmt(metrics['f1']):>9}  "
            f"{metrics['support']:>{support_width}}"
        )
    return "\n".join(lines)
