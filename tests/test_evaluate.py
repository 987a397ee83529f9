"""Evaluation metrics checked against hand-computed cases, the metrics file, and the plots."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from evaluation import metrics, plots

LABELS = ["daisy", "rose", "tulip"]

# Six examples, two per class. Argmax predictions: daisy, daisy | rose, daisy | tulip, daisy.
#   true \ pred  daisy rose tulip
#   daisy          1    1    0
#   rose           1    1    0
#   tulip          1    0    1
Y_TRUE = np.array([0, 0, 1, 1, 2, 2])
PROBS = np.array(
    [
        [0.70, 0.20, 0.10],  # daisy -> daisy (true prob 0.70, rank 1)
        [0.30, 0.60, 0.10],  # daisy -> rose  (true prob 0.30, rank 2)
        [0.15, 0.80, 0.05],  # rose  -> rose  (true prob 0.80, rank 1)
        [0.50, 0.40, 0.10],  # rose  -> daisy (true prob 0.40, rank 2)
        [0.20, 0.10, 0.70],  # tulip -> tulip (true prob 0.70, rank 1)
        [0.50, 0.30, 0.20],  # tulip -> daisy (true prob 0.20, rank 3)
    ]
)


@pytest.fixture()
def report() -> dict:
    return metrics.classification_report(Y_TRUE, PROBS, LABELS, k=2)


def test_confusion_matrix_rows_true_cols_predicted(report):
    assert report["confusion_matrix"] == [[1, 1, 0], [1, 1, 0], [1, 0, 1]]
    assert report["labels"] == LABELS
    assert report["examples"] == 6


def test_accuracy_and_top_k_by_hand(report):
    assert report["accuracy"] == pytest.approx(3 / 6)
    # Top-2 misses only the last example (its true class is ranked third).
    assert report["k"] == 2
    assert report["top_k_accuracy"] == pytest.approx(5 / 6)


def test_per_class_precision_recall_f1_support_by_hand(report):
    # Predicted-column totals: daisy 3, rose 2, tulip 1; every class has 1 of 2 right.
    expected = {
        "daisy": {"precision": 1 / 3, "recall": 1 / 2, "f1": 2 / 5, "support": 2},
        "rose": {"precision": 1 / 2, "recall": 1 / 2, "f1": 1 / 2, "support": 2},
        "tulip": {"precision": 1 / 1, "recall": 1 / 2, "f1": 2 / 3, "support": 2},
    }
    assert list(report["per_class"]) == LABELS
    for label, want in expected.items():
        got = report["per_class"][label]
        assert got["support"] == want["support"]
        for name in ("precision", "recall", "f1"):
            assert got[name] == pytest.approx(want[name]), (label, name)
    assert report["macro_f1"] == pytest.approx((2 / 5 + 1 / 2 + 2 / 3) / 3)  # 47/90


def test_loss_is_mean_natural_log_cross_entropy(report):
    true_probs = [0.70, 0.30, 0.80, 0.40, 0.70, 0.20]
    expected = -sum(math.log(p) for p in true_probs) / 6
    assert expected == pytest.approx(0.7776991, abs=1e-6)
    assert report["loss"] == pytest.approx(expected, rel=1e-12)


def test_loss_clips_zero_probability_of_true_class():
    probs = np.array([[1.0, 0.0], [0.0, 1.0]])
    report = metrics.classification_report(np.array([0, 0]), probs, ["a", "b"])
    # Example 1 is right (log 1 = 0); example 2 gives its true class 0 -> clipped to 1e-7.
    assert report["loss"] == pytest.approx(-math.log(1e-7) / 2)
    assert math.isfinite(report["loss"])


def test_top_k_defaults_to_min_of_five_and_classes():
    assert metrics.classification_report(Y_TRUE, PROBS, LABELS)["k"] == 3
    assert metrics.classification_report(Y_TRUE, PROBS, LABELS)["top_k_accuracy"] == 1.0
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(8), size=20)
    y = rng.integers(0, 8, size=20)
    report = metrics.classification_report(y, probs, [f"c{i}" for i in range(8)])
    assert report["k"] == 5
    ranks = np.sum(probs > probs[np.arange(20), y][:, None], axis=1)
    assert report["top_k_accuracy"] == pytest.approx(np.mean(ranks < 5))


def test_top_1_equals_accuracy_without_ties(report):
    top1 = metrics.classification_report(Y_TRUE, PROBS, LABELS, k=1)
    assert top1["top_k_accuracy"] == pytest.approx(report["accuracy"])


def test_perfect_predictions():
    probs = np.eye(3)[[0, 1, 2, 2, 1]]
    report = metrics.classification_report(np.array([0, 1, 2, 2, 1]), probs, LABELS)
    assert report["accuracy"] == 1.0
    assert report["top_k_accuracy"] == 1.0
    assert report["macro_f1"] == 1.0
    assert all(m["f1"] == 1.0 for m in report["per_class"].values())
    assert report["loss"] == pytest.approx(0.0, abs=1e-12)
    assert report["confusion_matrix"] == [[1, 0, 0], [0, 2, 0], [0, 0, 2]]


def test_class_never_predicted_and_class_without_examples_are_zero_not_nan():
    # tulip is never predicted (precision undefined); rose has no examples (recall undefined).
    y = np.array([0, 0, 2])
    probs = np.array([[0.9, 0.05, 0.05], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    report = metrics.classification_report(y, probs, LABELS)
    tulip, rose = report["per_class"]["tulip"], report["per_class"]["rose"]
    assert tulip == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rose == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # daisy: 1 right of 2 predicted, 1 of 2 true.
    assert report["per_class"]["daisy"]["precision"] == pytest.approx(0.5)
    assert report["macro_f1"] == pytest.approx(0.5 / 3)
    json.dumps(report, allow_nan=False)  # raises on any NaN


def test_no_examples_reports_none_averages():
    report = metrics.classification_report(np.array([], dtype=int), np.zeros((0, 3)), LABELS)
    assert report["examples"] == 0
    assert report["accuracy"] is None
    assert report["top_k_accuracy"] is None
    assert report["loss"] is None
    assert report["macro_f1"] is None
    assert report["k"] == 3
    assert report["confusion_matrix"] == [[0, 0, 0]] * 3
    assert all(
        m == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        for m in report["per_class"].values()
    )
    assert "null" in json.dumps(report, allow_nan=False)


def test_no_examples_accepts_plain_empty_lists():
    report = metrics.classification_report(np.array([]), np.array([]), LABELS)
    assert report["examples"] == 0


def _plain_types_only(value) -> bool:
    if isinstance(value, dict):
        return all(type(k) is str and _plain_types_only(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_plain_types_only(v) for v in value)
    return value is None or type(value) in (int, float, str, bool)


def test_report_is_plain_json_round_trip(report):
    assert _plain_types_only(report)
    assert json.loads(json.dumps(report, allow_nan=False)) == report


def test_float_label_indices_that_are_whole_numbers_are_accepted(report):
    assert metrics.classification_report(Y_TRUE.astype(float), PROBS, LABELS, k=2) == report


@pytest.mark.parametrize(
    ("y_true", "probs", "labels", "k", "message"),
    [
        (Y_TRUE, PROBS, ["a", "b"], None, "one column per label"),
        (Y_TRUE[:5], PROBS, LABELS, None, "6 rows"),
        (np.array([0, 0, 1, 1, 2, 3]), PROBS, LABELS, None, "outside"),
        (np.array([0, 0, 1, 1, 2, -1]), PROBS, LABELS, None, "outside"),
        (Y_TRUE + 0.5, PROBS, LABELS, None, "integer"),
        (Y_TRUE[:, None], PROBS, LABELS, None, "1-D"),
        (Y_TRUE, np.where(PROBS > 0.75, np.nan, PROBS), LABELS, None, "NaN"),
        (Y_TRUE, PROBS, LABELS, 0, "k must be"),
        (Y_TRUE, PROBS, LABELS, 4, "k must be"),
        (Y_TRUE, PROBS, ["a", "a", "b"], None, "duplicates"),
        (Y_TRUE, PROBS, [], None, "empty"),
    ],
)
def test_bad_inputs_raise_value_error(y_true, probs, labels, k, message):
    with pytest.raises(ValueError, match=message):
        metrics.classification_report(y_true, probs, labels, k=k)


def test_write_metrics_round_trip(tmp_path, report):
    path = tmp_path / "out" / "metrics.json"
    metrics.write_metrics(str(path), {"eval": report, "test": report})
    text = path.read_text()
    assert text.startswith("{\n  ")  # indented
    assert json.loads(text) == {"eval": report, "test": report}


def test_write_metrics_converts_numpy_values(tmp_path):
    path = tmp_path / "metrics.json"
    metrics.write_metrics(str(path), {"eval": {"accuracy": np.float32(0.5), "m": np.eye(2)}})
    assert json.loads(path.read_text()) == {"eval": {"accuracy": 0.5, "m": [[1, 0], [0, 1]]}}


def test_write_metrics_rejects_remote_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="local"):
        metrics.write_metrics("gs://bucket/metrics.json", {})
    assert not (tmp_path / "gs:").exists()


def test_evaluate_does_not_import_tensorflow():
    # A fresh interpreter: other tests in this process may already have imported TensorFlow.
    code = "import sys, evaluation.metrics, evaluation.plots; sys.exit(int('tensorflow' in sys.modules))"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", code], cwd=root, check=False)
    assert result.returncode == 0


def test_format_report_table(report):
    table = metrics.format_report_table(report)
    lines = table.splitlines()
    assert lines[0].split() == ["examples", "6"]
    assert lines[1].split() == ["accuracy", "0.5000"]
    assert lines[2].split() == ["top-2", "accuracy", "0.8333"]
    header = next(i for i, line in enumerate(lines) if line.startswith("class"))
    assert lines[header].split() == ["class", "precision", "recall", "f1", "support"]
    rows = lines[header + 1 :]
    assert [row.split() for row in rows] == [
        ["daisy", "0.3333", "0.5000", "0.4000", "2"],
        ["rose", "0.5000", "0.5000", "0.5000", "2"],
        ["tulip", "1.0000", "0.5000", "0.6667", "2"],
    ]
    # Columns aligned: every class row has the same length as the header.
    assert {len(row) for row in rows} == {len(lines[header])}


def test_format_report_table_without_examples():
    report = metrics.classification_report(np.zeros(0, int), np.zeros((0, 2)), ["a", "b"])
    table = metrics.format_report_table(report)
    assert "accuracy  n/a" in table
    assert table.splitlines()[-1].split() == ["b", "0.0000", "0.0000", "0.0000", "0"]


# --- plots -------------------------------------------------------------------------------------


def _png(path) -> Image.Image:
    assert path.exists() and path.stat().st_size > 0
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    image = Image.open(path)
    image.verify()  # raises on a truncated or corrupt file
    image = Image.open(path)
    assert image.format == "PNG"
    image.load()
    return image


def _random_matrix(num_classes: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 4, (num_classes, num_classes)) + np.diag(
        rng.integers(10, 30, num_classes)
    )


@pytest.mark.parametrize("num_classes", [2, 30])
def test_plot_confusion_matrix_writes_png(tmp_path, num_classes):
    labels = [f"class_{i}" for i in range(num_classes)]
    path = tmp_path / "plots" / "cm.png"
    plots.plot_confusion_matrix(str(path), _random_matrix(num_classes), labels, "eval")
    image = _png(path)
    width, height = image.size
    assert 300 <= width <= 2500 and 300 <= height <= 2500
    # Not blank: a colour map and text make many distinct colours.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


def test_confusion_matrix_figure_grows_with_classes():
    small = plots.confusion_matrix_figure(_random_matrix(2), ["a", "b"], "t")
    big = plots.confusion_matrix_figure(_random_matrix(30), [str(i) for i in range(30)], "t")
    assert big.get_size_inches()[0] > small.get_size_inches()[0]


def test_confusion_matrix_figure_counts_colours_and_axis_labels():
    matrix = np.array([[8, 2], [0, 5]])
    figure = plots.confusion_matrix_figure(matrix, ["cat", "dog"], "eval split")
    axes = figure.axes[0]
    assert axes.get_xlabel() == "predicted"
    assert axes.get_ylabel() == "true"
    assert axes.get_title() == "eval split"
    assert [t.get_text() for t in axes.get_xticklabels()] == ["cat", "dog"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["cat", "dog"]
    assert all(t.get_rotation() != 0 for t in axes.get_xticklabels())
    # One count per cell, in row-major order (row = true).
    texts = {(t.get_position(), t.get_text()) for t in axes.texts}
    assert texts == {((0, 0), "8"), ((1, 0), "2"), ((0, 1), "0"), ((1, 1), "5")}
    # Colour is row-normalised: recall per true class.
    np.testing.assert_allclose(axes.images[0].get_array(), [[0.8, 0.2], [0.0, 1.0]])


def test_confusion_matrix_figure_empty_row_is_zero_not_nan():
    figure = plots.confusion_matrix_figure(np.array([[3, 1], [0, 0]]), ["a", "b"], "t")
    data = np.asarray(figure.axes[0].images[0].get_array())
    assert np.all(np.isfinite(data))
    np.testing.assert_allclose(data, [[0.75, 0.25], [0.0, 0.0]])


def test_confusion_matrix_figure_omits_cell_text_for_many_classes():
    n = plots.MAX_CLASSES_WITH_CELL_TEXT
    few = plots.confusion_matrix_figure(_random_matrix(n), [str(i) for i in range(n)], "t")
    many = plots.confusion_matrix_figure(_random_matrix(n + 5), [str(i) for i in range(n + 5)], "t")
    assert len(few.axes[0].texts) == n * n
    assert len(many.axes[0].texts) == 0


def test_plot_confusion_matrix_rejects_wrong_shape(tmp_path):
    with pytest.raises(ValueError, match="3 x 3"):
        plots.plot_confusion_matrix(str(tmp_path / "cm.png"), np.eye(2), LABELS, "t")


def test_plots_leave_no_open_pyplot_figures(tmp_path):
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    for i in range(3):
        plots.plot_confusion_matrix(str(tmp_path / f"cm{i}.png"), np.eye(2), ["a", "b"], "t")
        plots.plot_training_curves(str(tmp_path / f"c{i}.png"), {"loss": [1.0, 0.5]})
    assert plt.get_fignums() == before


HISTORY = {
    "loss": [1.2, 0.9, 0.7, 0.6, 0.45, 0.4],
    "val_loss": [1.3, 1.0, 0.8, 0.75, 0.6, 0.58],
    "accuracy": [0.5, 0.6, 0.7, 0.75, 0.82, 0.85],
    "val_accuracy": [0.45, 0.55, 0.65, 0.7, 0.76, 0.78],
}


def _lines(axes) -> dict[str, list]:
    return {line.get_label(): line for line in axes.get_lines()}


def test_training_curves_two_panels_train_and_eval():
    figure = plots.training_curves_figure(HISTORY)
    loss_axes, accuracy_axes = figure.axes
    assert loss_axes.get_title() == "loss" and accuracy_axes.get_title() == "accuracy"
    loss_lines, accuracy_lines = _lines(loss_axes), _lines(accuracy_axes)
    assert set(loss_lines) == set(accuracy_lines) == {"train", "eval"}
    np.testing.assert_allclose(loss_lines["train"].get_xdata(), [1, 2, 3, 4, 5, 6])
    np.testing.assert_allclose(loss_lines["eval"].get_ydata(), HISTORY["val_loss"])
    np.testing.assert_allclose(accuracy_lines["train"].get_ydata(), HISTORY["accuracy"])
    assert not loss_axes.texts  # no "no data" message


def test_training_curves_without_val_keys_and_legacy_acc():
    history = {"loss": [1.0, 0.5, 0.3], "acc": [0.4, 0.6, 0.7]}
    figure = plots.training_curves_figure(history)
    loss_axes, accuracy_axes = figure.axes
    assert set(_lines(loss_axes)) == {"train"}
    np.testing.assert_allclose(_lines(accuracy_axes)["train"].get_ydata(), history["acc"])


def test_training_curves_missing_accuracy_says_so():
    figure = plots.training_curves_figure({"loss": [1.0, 0.5]})
    accuracy_axes = figure.axes[1]
    assert not accuracy_axes.get_lines()
    assert [t.get_text() for t in accuracy_axes.texts] == ["no accuracy recorded"]


def test_training_curves_stage_marker_between_stages():
    history = {**HISTORY, "stage": [0, 0, 0, 0, 1, 1]}
    figure = plots.training_curves_figure(history)
    for axes in figure.axes:
        markers = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
        markers = [m for m in markers if m.get_label() == "fine-tuning"]
        assert len(markers) == 1
        # Between epoch 4 (last of stage 0) and epoch 5 (first of stage 1).
        assert list(markers[0].get_xdata()) == [4.5, 4.5]
        legend = [t.get_text() for t in axes.get_legend().get_texts()]
        assert "fine-tuning" in legend


def test_training_curves_no_marker_for_single_stage():
    figure = plots.training_curves_figure({**HISTORY, "stage": [0] * 6})
    for axes in figure.axes:
        assert "fine-tuning" not in _lines(axes)


@pytest.mark.parametrize(
    "history",
    [
        HISTORY,
        {"loss": [1.0, 0.8, 0.5], "accuracy": [0.3, 0.5, 0.6]},
        {**HISTORY, "stage": [0, 0, 0, 0, 1, 1]},
        {},
    ],
    ids=["train+eval", "train-only", "stage-marker", "empty"],
)
def test_plot_training_curves_writes_png(tmp_path, history):
    path = tmp_path / "curves" / "training.png"
    plots.plot_training_curves(str(path), history)
    image = _png(path)
    width, height = image.size
    assert width > height  # two panels side by side
    assert 600 <= width <= 2000 and 250 <= height <= 1000
