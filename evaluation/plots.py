"""The plots a person reads: the confusion matrix and the training curves, as PNG files or bytes.

Plots are drawn on ``matplotlib.figure.Figure`` objects rendered by the Agg backend; pyplot's
global figure registry is never touched, so nothing accumulates across calls and the caller's
matplotlib backend is left alone.
"""

from __future__ import annotations

import io
import logging
import os
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from evaluation.metrics import safe_divide

_LOGGER = logging.getLogger(__name__)

# Above this many classes the confusion-matrix cells carry colour only, no count text.
MAX_CLASSES_WITH_CELL_TEXT = 25
# Keras History keys, first match wins; older Keras wrote "acc".
_LOSS_KEYS = ("loss", "val_loss")
_ACCURACY_KEYS = (("accuracy", "acc"), ("val_accuracy", "val_acc"))
_STAGE_KEY = "stage"
_DPI = 100
_TITLE_CHARS = 95  # a 10-point title line across the learning-curve figure


def _png(figure: Figure) -> bytes:
    """Renders ``figure`` to PNG bytes with the Agg canvas."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=_DPI)
    return buffer.getvalue()


def _save(figure: Figure, path: str) -> None:
    """Renders ``figure`` to a PNG at a local ``path``."""
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    with open(path, "wb") as f:
        f.write(_png(figure))
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
    normalised = safe_divide(counts.astype(np.float64), np.broadcast_to(row_totals, counts.shape))

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


def confusion_matrix_png(matrix: Any, labels: Sequence[str], title: str) -> bytes:
    """The confusion-matrix PNG of :func:`plot_confusion_matrix`, as bytes for any storage."""
    return _png(confusion_matrix_figure(matrix, labels, title))


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


def training_curves_png(history: Mapping[str, Sequence[float]]) -> bytes:
    """The training-curve PNG of :func:`plot_training_curves`, as bytes for any storage."""
    return _png(training_curves_figure(history))


def learning_curve_figure(
    points: Sequence[Mapping[str, Any]], title: str = "learning curve", ylabel: str = "accuracy"
) -> Figure:
    """Draws accuracy against labels per class: the mean of the draws with a +-1 std band,
    each draw as a dot, on a log x axis.

    Args:
        points: dicts with ``k`` (labels per class), ``mean``, ``std`` and ``accuracies`` (one
            per draw), in increasing ``k`` (the audit's ``learning_curve.json`` points).
        title: figure title (e.g. the curve's one-line reading), wrapped to the figure's width.
        ylabel: what was measured (e.g. "test accuracy").

    Returns:
        The figure (not registered with pyplot).
    """
    figure = Figure(figsize=(7.5, 4.5), layout="constrained")
    axes = figure.add_subplot()
    if not points:
        axes.text(0.5, 0.5, "no points", ha="center", va="center", transform=axes.transAxes)
        axes.set_title(textwrap.fill(title, _TITLE_CHARS), fontsize=10)
        return figure
    ks = np.array([float(p["k"]) for p in points])
    means = np.array([float(p["mean"]) for p in points])
    stds = np.array([float(p["std"]) for p in points])
    for k, point in zip(ks, points, strict=True):
        draws = [float(a) for a in point.get("accuracies", [])]
        axes.plot([k] * len(draws), draws, ".", color="grey", alpha=0.5, markersize=4)
    axes.fill_between(ks, means - stds, means + stds, alpha=0.2, label="mean +- 1 std")
    axes.plot(ks, means, "o-", label="mean of the draws")
    axes.set_xscale("log")
    axes.set_xticks(ks, labels=[str(int(k)) for k in ks])
    axes.minorticks_off()
    axes.set_xlabel("labeled examples per class (last point: all)")
    axes.set_ylabel(ylabel)
    axes.set_title(textwrap.fill(title, _TITLE_CHARS), fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right")
    return figure


def learning_curve_png(
    points: Sequence[Mapping[str, Any]], title: str = "learning curve", ylabel: str = "accuracy"
) -> bytes:
    """The learning-curve PNG of :func:`learning_curve_figure`, as bytes for any storage."""
    return _png(learning_curve_figure(points, title, ylabel))
