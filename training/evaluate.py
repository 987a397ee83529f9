"""Evaluation of a trained classifier: metrics, the metrics file, and the plots a person reads.

This module owns everything computed from (true label, predicted probabilities) pairs once the
model has run: accuracy, top-k accuracy, cross-entropy, per-class precision/recall/F1, the
confusion matrix, the JSON metrics file, the confusion-matrix and training-curve PNGs, and the
text table the CLI prints. It is numpy + matplotlib only: it never imports TensorFlow, so it can be
used (and tested) on outputs saved from any run.

Plots are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend; pyplot's global
figure registry is never touched, so nothing accumulates across calls and the caller's matplotlib
backend is left alone.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

_LOGGER = logging.getLogger(__name__)

# Probabilities are clipped to [EPSILON, 1] before the log, as Keras does.
EPSILON = 1e-7
DEFAULT_MAX_K = 5
# Above this many classes the confusion-matrix cells carry colour only, no count text.
MAX_CLASSES_WITH_CELL_TEXT = 25
# Keras History keys, first match wins; older Keras wrote "acc".
_LOSS_KEYS = ("loss", "val_loss")
_ACCURACY_KEYS = (("accuracy", "acc"), ("val_accuracy", "val_acc"))
_STAGE_KEY = "stage"
_DPI = 100


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


def _safe_divide(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
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
    precision = _safe_divide(true_positives, predicted.astype(np.float64))
    recall = _safe_divide(true_positives, support.astype(np.float64))
    f1 = _safe_divide(2.0 * precision * recall, precision + recall)
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


def write_metrics(path: str, reports: Mapping[str, Mapping[str, Any]]) -> None:
    """Writes ``{"eval": report, "test": report, ...}`` to ``path`` as indented JSON.

    Args:
        path: a local file path; missing parent directories are created.
        reports: split name -> report from :func:`classification_report`.

    Raises:
        ValueError: if ``path`` is a remote URL (``gs://`` etc.); write locally and copy it up.
    """
    if "://" in path:
        raise ValueError(
            f"write_metrics writes local files only, got {path!r}; write to a local path and "
            "copy it to remote storage (e.g. with tf.io.gfile.copy in the trainer)."
        )
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    text = json.dumps(dict(reports), indent=2, default=_json_default, allow_nan=False)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text + "\n")
    _LOGGER.info("Wrote metrics for %s to %s", ", ".join(reports) or "no splits", path)


def _save(figure: Figure, path: str) -> None:
    """Renders ``figure`` to a PNG at ``path`` with the Agg canvas."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    FigureCanvasAgg(figure)
    figure.savefig(path, format="png", dpi=_DPI)
    _LOGGER.info("Wrote %s", path)


def confusion_matrix_figure(matrix: Any, labels: Sequence[str], title: str) -> Figure:
    """Draws a confusion matrix: colour = row-normalised (recall per true class), text = counts.

    Figure size and font size scale with the number of classes; tick labels on the x axis are
    rotated; above ``MAX_CLASSES_WITH_CELL_TEXT`` classes the count text is left out.

    Args:
        matrix: C x C counts, rows = true label, columns = predicted label.
        labels: the C class names in label-index order.
        title: figure title.

    Returns:
        The figure (not registered with pyplot).

    Raises:
        ValueError: if ``matrix`` is not C x C for C = ``len(labels)``.
    """
    counts = np.asarray(matrix)
    num_classes = len(labels)
    if num_classes == 0 or counts.shape != (num_classes, num_classes):
        raise ValueError(
            f"matrix must be {num_classes} x {num_classes} to match labels, got {counts.shape}."
        )
    row_totals = counts.sum(axis=1, keepdims=True).astype(np.float64)
    normalised = _safe_divide(counts.astype(np.float64), np.broadcast_to(row_totals, counts.shape))

    side = float(np.clip(3.0 + 0.32 * num_classes, 5.0, 20.0))
    # Roughly 75% of the side is matrix; size text to the cell pitch (72 points per inch).
    cell_points = 0.75 * side * 72.0 / num_classes
    font = float(np.clip(0.45 * cell_points, 7.0, 11.0))
    figure = Figure(figsize=(side + 1.2, side), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(normalised, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colorbar = figure.colorbar(image, ax=axes, fraction=0.046, pad=0.03)
    colorbar.set_label("fraction of true class (recall on the diagonal)", fontsize=font)
    colorbar.ax.tick_params(labelsize=font)

    ticks = np.arange(num_classes)
    axes.set_xticks(ticks, labels=list(labels), fontsize=font)
    axes.set_yticks(ticks, labels=list(labels), fontsize=font)
    rotation = 45 if num_classes <= 12 else 90
    for tick in axes.get_xticklabels():
        tick.set_rotation(rotation)
        tick.set_horizontalalignment("right" if rotation == 45 else "center")
        tick.set_rotation_mode("anchor" if rotation == 45 else "default")
    axes.set_xlabel("predicted", fontsize=font + 1)
    axes.set_ylabel("true", fontsize=font + 1)
    axes.set_title(title, fontsize=font + 2)

    if num_classes <= MAX_CLASSES_WITH_CELL_TEXT:
        cell_font = float(np.clip(0.4 * cell_points, 7.0, 12.0))
        for row in range(num_classes):
            for col in range(num_classes):
                axes.text(
                    col,
                    row,
                    str(int(counts[row, col])),
                    ha="center",
                    va="center",
                    fontsize=cell_font,
                    color="white" if normalised[row, col] > 0.5 else "black",
                )
    return figure


def plot_confusion_matrix(path: str, matrix: Any, labels: Sequence[str], title: str) -> None:
    """Writes a confusion-matrix PNG (see :func:`confusion_matrix_figure`) to a local ``path``.

    Args:
        path: local PNG path; missing parent directories are created.
        matrix: C x C counts, rows = true label, columns = predicted label (as in the report's
            ``confusion_matrix``).
        labels: the C class names in label-index order.
        title: figure title.
    """
    _save(confusion_matrix_figure(matrix, labels, title), path)


def _first_present(history: Mapping[str, Sequence[float]], keys: Sequence[str]) -> str | None:
    for key in keys:
        if history.get(key):
            return key
    return None


def _stage_changes(stages: Sequence[int]) -> list[int]:
    """0-based indices of the epochs whose stage differs from the previous epoch's."""
    return [i for i in range(1, len(stages)) if stages[i] != stages[i - 1]]


def training_curves_figure(history: Mapping[str, Sequence[float]]) -> Figure:
    """Draws loss and accuracy per epoch, train vs eval, side by side.

    Epochs are numbered from 1. Missing keys are skipped (a panel with no series says so). If
    ``history["stage"]`` is present, a dashed vertical line labelled "fine-tuning" is drawn
    between the last epoch of one stage and the first of the next.

    Args:
        history: Keras ``History.history``-style dict: ``loss``, ``val_loss``, ``accuracy``,
            ``val_accuracy`` (``acc``/``val_acc`` also accepted), optionally ``stage``: one int
            per epoch.

    Returns:
        The figure (not registered with pyplot).
    """
    figure = Figure(figsize=(11.0, 4.2), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    panels = (
        (loss_axes, "loss", (("loss",), ("val_loss",))),
        (accuracy_axes, "accuracy", _ACCURACY_KEYS),
    )
    changes = _stage_changes(list(history.get(_STAGE_KEY) or []))
    for axes, name, (train_keys, eval_keys) in panels:
        plotted = False
        for keys, split, style in ((train_keys, "train", "o-"), (eval_keys, "eval", "s--")):
            key = _first_present(history, keys)
            if key is None:
                continue
            values = [float(v) for v in history[key]]
            epochs = np.arange(1, len(values) + 1)
            axes.plot(epochs, values, style, markersize=3, label=split)
            plotted = True
        for n, change in enumerate(changes):
            # Epoch numbers are 1-based: the change sits between epoch `change` and `change + 1`.
            axes.axvline(
                change + 0.5,
                color="grey",
                linestyle="--",
                linewidth=1.0,
                label="fine-tuning" if n == 0 else None,
            )
        if not plotted:
            axes.text(
                0.5,
                0.5,
                f"no {name} recorded",
                ha="center",
                va="center",
                transform=axes.transAxes,
                color="grey",
            )
            axes.set_yticks([])
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.set_ylabel(name)
        axes.xaxis.get_major_locator().set_params(integer=True)
        axes.grid(True, alpha=0.3)
        if axes.get_legend_handles_labels()[0]:
            axes.legend()
    return figure


def plot_training_curves(path: str, history: Mapping[str, Sequence[float]]) -> None:
    """Writes a two-panel (loss, accuracy) training-curve PNG to a local ``path``.

    See :func:`training_curves_figure` for the accepted keys and the fine-tuning marker.

    Args:
        path: local PNG path; missing parent directories are created.
        history: Keras ``History.history``-style dict, optionally with ``stage``.
    """
    _save(training_curves_figure(history), path)


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
