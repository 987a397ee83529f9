"""The trainer's ``report.html`` in ``--model_dir``: metrics, plots, the misclassified test images
and a short model card (rendered by :func:`evaluation.html_report.model_page`).

:func:`write_model_report` runs once the model is evaluated. It reads the test split itself,
shard after shard in file order, and predicts each batch with the trained model, so a prediction
never leaves its image's URI and bytes. (The evaluation datasets read shards in parallel: their
order is the tf.data runtime's interleaving, deterministic but not promised to be file order.)
The most confident mistakes of each confusion-matrix cell get a thumbnail in
``report_thumbs/<sha256>.jpg``; the page links them, and the plots, relatively, so the model dir
opens offline (locally, or copied from ``gs://``).
"""

from __future__ import annotations

import dataclasses
import datetime
import heapq
import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import tensorflow as tf

from evaluation import html_report
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from storage.fileops import delete, join
from training import data, layout
from training.config import TrainConfig

_LOGGER = logging.getLogger(__name__)
PER_CELL = 24  # misclassified test images shown per confusion-matrix cell
MAX_GALLERY = 400  # and in all, most confident mistakes first
FEW_PER_CLASS = 20  # a label with fewer train images than this is named as a limitation


@dataclasses.dataclass(order=True)
class Mistake:
    """A misclassified test image (ordered by score, the predicted label's probability)."""

    score: float
    uri: str = dataclasses.field(compare=False)
    sha256: str = dataclasses.field(compare=False)
    true_index: int = dataclasses.field(compare=False)
    predicted_index: int = dataclasses.field(compare=False)


@dataclasses.dataclass
class TestPredictions:
    """The test split predicted in file order: the confusion matrix and the mistakes kept."""

    matrix: np.ndarray
    mistakes: list[Mistake]


def _records(files: list[str], spec: Mapping[str, Any]) -> tf.data.Dataset:
    """Parsed records of ``files``, one file after the other, in file order."""
    return tf.data.TFRecordDataset(files, features.tfrecord_compression(files)).map(
        lambda record: tf.io.parse_single_example(record, spec),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )


def predict_test_split(
    config: TrainConfig, dataset: data.Dataset, model, per_cell: int = PER_CELL
) -> TestPredictions:
    """Predicts the test split with ``model``, keeping each prediction with its record.

    ``model`` takes what the trainer's datasets feed it: the raw stored embedding, or the image
    preprocessed by :func:`training.data.image_preprocessor`. Of the misclassified images, the
    ``per_cell`` most confident of each (true, predicted) cell are kept.
    """
    manifest = dataset.manifest
    spec = features.feature_spec(manifest.backbone.embedding_dim)
    key = features.IMAGE_ENCODED if config.uses_images else features.EMBEDDING
    wanted = {
        k: spec[k] for k in (key, features.LABEL, features.IMAGE_SOURCE, features.IMAGE_SHA256)
    }
    preprocess = data.image_preprocessor(config, manifest)[0] if config.uses_images else None

    def model_input(example):
        x = preprocess(example[key]) if preprocess else example[key]
        return (
            x,
            example[features.LABEL],
            example[features.IMAGE_SOURCE],
            example[features.IMAGE_SHA256],
        )

    records = _records(dataset.files[csv_format.TEST], wanted)
    batches = records.map(model_input, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    num_classes = len(manifest.labels)
    matrix = np.zeros((num_classes, num_classes), np.int64)
    cells: dict[tuple[int, int], list[Mistake]] = {}
    for x, y, uris, shas in batches.batch(config.batch_size).prefetch(tf.data.AUTOTUNE):
        probabilities = model(x, training=False).numpy()
        predicted = probabilities.argmax(axis=1)
        for n, (true, guess) in enumerate(zip(y.numpy(), predicted, strict=True)):
            matrix[true, guess] += 1
            if true == guess:
                continue
            mistake = Mistake(
                float(probabilities[n, guess]),
                uris[n].numpy().decode("utf-8"),
                shas[n].numpy().decode("ascii"),
                int(true),
                int(guess),
            )
            heap = cells.setdefault((int(true), int(guess)), [])
            (heapq.heappush if len(heap) < per_cell else heapq.heappushpop)(heap, mistake)
    mistakes = sorted((m for heap in cells.values() for m in heap), reverse=True)
    return TestPredictions(matrix, mistakes)


def write_thumbnails(files: list[str], sha256s: set[str], folder: str) -> dict[str, str]:
    """Writes ``<folder>/<sha256>.jpg`` thumbnails of the records whose sha256 is given.

    Returns:
      sha256 -> thumbnail file name, for the images that had stored, decodable bytes.
    """
    spec = features.feature_spec(1)  # only the bytes features are parsed
    wanted = {k: spec[k] for k in (features.IMAGE_SHA256, features.IMAGE_ENCODED)}
    written: dict[str, str] = {}
    if not sha256s:
        return written
    tf.io.gfile.makedirs(folder)
    for example in _records(files, wanted):
        sha256 = example[features.IMAGE_SHA256].numpy().decode("ascii")
        if sha256 not in sha256s or sha256 in written:
            continue
        encoded = example[features.IMAGE_ENCODED].numpy()
        try:
            thumbnail = html_report.thumbnail_jpeg(encoded) if encoded else None
        except OSError as e:
            _LOGGER.warning("no thumbnail for %s: %s", sha256, e)
            thumbnail = None
        if thumbnail:
            name = f"{sha256}.jpg"
            with tf.io.gfile.GFile(join(folder, name), "wb") as f:
                f.write(thumbnail)
            written[sha256] = name
        if len(written) == len(sha256s):
            break
    return written


def _wilson_half_width(accuracy: float, n: int, z: float = 1.96) -> float:
    """Half the width of the 95% Wilson score interval of a proportion from ``n`` trials."""
    if n <= 0:
        return float("nan")
    return z / (1 + z * z / n) * math.sqrt(accuracy * (1 - accuracy) / n + z * z / (4 * n * n))


def model_card(config: TrainConfig, dataset: data.Dataset, reports: Mapping[str, Any]) -> dict:
    """Intended use, limitations, evaluation and training of the model, as sentences."""
    manifest = dataset.manifest
    labels = manifest.labels
    test = reports.get(csv_format.TEST) or {}
    # With --examples_per_class the model saw the draw, not the whole train split.
    train_counts = dataset.train_labels or manifest.splits.get(csv_format.TRAIN, {}).get(
        "labels", {}
    )
    counts = [int(train_counts.get(label, 0)) for label in labels]
    n_test, n_eval = dataset.counts[csv_format.TEST], dataset.counts[csv_format.EVAL]
    limitations = [
        f"Trained on {dataset.examples(csv_format.TRAIN):,} labeled images, "
        + (f"{min(counts)} to {max(counts)}" if min(counts) < max(counts) else f"{max(counts)}")
        + " per label."
    ]
    few = [label for label, n in zip(labels, counts, strict=True) if n < FEW_PER_CLASS]
    if few:
        limitations.append(
            f"Fewer than {FEW_PER_CLASS} training images for {', '.join(few)}: expect lower "
            "accuracy there; more labels for these would help most."
        )
    if min(counts) and max(counts) / min(counts) >= 3:
        limitations.append(
            "The labels are imbalanced: overall accuracy leans towards the larger ones; read "
            "the per-class recall."
        )
    if test.get("accuracy") is not None:
        half = _wilson_half_width(test["accuracy"], n_test)
        limitations.append(
            f"The test split has {n_test:,} images, so its accuracy of {test['accuracy']:.1%} "
            f"is known to about ±{half:.1%} (95% interval)."
        )
        per_class = test.get("per_class") or {}
        if per_class:
            weakest = min(per_class, key=lambda label: per_class[label]["recall"])
            limitations.append(
                f"Weakest label: {weakest} (recall {per_class[weakest]['recall']:.1%} on test)."
            )
    limitations.append(
        "Only images like these were measured: other cameras, lighting, backgrounds or subjects "
        "may do worse, and images of none of the labels still get one of them."
    )
    if config.from_scratch:
        training = (
            f"A small {config.model} net trained from scratch on {config.image_size} px "
            f"{'grayscale' if config.channels == 1 else 'RGB'} images."
        )
    else:
        hidden = ", ".join(map(str, config.hidden_units)) or "none"
        on = "the images" if config.uses_images else "the backbone's stored embeddings"
        training = (
            f"A classifier head (hidden units: {hidden}, dropout {config.dropout}) on the frozen "
            f"backbone {manifest.backbone.name}, trained on {on}"
        )
        if config.augment:
            training += " with augmentation"
        if config.fine_tune:
            training += f", then fine-tuned for up to {config.fine_tune_epochs} epochs"
        training += "."
    training += (
        f" {config.optimizer} optimizer, learning rate {config.learning_rate:g} "
        f"({config.lr_schedule}), batch {config.batch_size}, up to {config.epochs} epochs with "
        f"early stopping on the eval loss (patience {config.patience}), seed {config.seed}."
    )
    return {
        "intended_use": (
            f"Sorting images into one of {len(labels)} labels: {', '.join(labels)}. It gives every "
            "image one of them, so it suits images of these kinds only; have a person check "
            "predictions where a mistake matters."
        ),
        "limitations": limitations,
        "evaluation": (
            f"Accuracy and per-class precision, recall and F1 on the test split ({n_test:,} "
            "images never trained on). Images are assigned to splits by the sha256 of their "
            "bytes, so an exact copy never spans two splits; resized or recompressed copies can "
            f"(hubflow-audit finds them). The eval split ({n_eval:,} images) decided when "
            "training stopped, so its accuracy is slightly optimistic."
        ),
        "training": training,
    }


def model_page_data(
    config: TrainConfig,
    dataset: data.Dataset,
    reports: Mapping[str, Any],
    predictions: TestPredictions,
    thumbs: Mapping[str, str],
) -> dict[str, Any]:
    """The dict :func:`evaluation.html_report.model_page` renders."""
    manifest = dataset.manifest
    labels = manifest.labels
    shown = predictions.mistakes[:MAX_GALLERY]
    files = {
        "metrics": layout.METRICS_FILE,
        "options and data": layout.CONFIG_FILE,
        "history": layout.HISTORY_FILE,
        "labels": manifest_lib.LABELS_FILE,
        "SavedModel versions": f"{serving.EXPORT_DIR}/",
    }
    if config.export_tflite:
        files["TensorFlow Lite model"] = layout.TFLITE_FILE
    return {
        "model_dir": config.model_dir,
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backbone": manifest.backbone.to_json(),
        "labels": list(labels),
        "counts": {split: manifest.splits[split] for split in csv_format.SPLITS},
        "metrics": {split: reports[split] for split in csv_format.SPLITS if split in reports},
        "train_seconds": reports.get("train_seconds"),
        "options": config.to_json(),
        "card": model_card(config, dataset, reports),
        "plots": {"curves": layout.CURVES_PNG, "confusion": layout.CONFUSION_PNG},
        "misclassified": {
            "total": int(predictions.matrix.sum() - np.trace(predictions.matrix)),
            "rows": [
                {
                    "uri": m.uri,
                    "true_label": labels[m.true_index],
                    "predicted_label": labels[m.predicted_index],
                    "score": round(m.score, 4),
                    "thumb": (
                        f"{layout.REPORT_THUMBS_DIR}/{thumbs[m.sha256]}"
                        if m.sha256 in thumbs
                        else None
                    ),
                }
                for m in shown
            ],
        },
        "files": files,
    }


def write_model_report(
    config: TrainConfig, dataset: data.Dataset, model, reports: Mapping[str, Any]
) -> str:
    """Writes ``report.html`` and its thumbnails into ``config.model_dir``; returns the page's path.

    Args:
      config: the run's options.
      dataset: the data it trained on (:func:`training.data.load`).
      model: the trained model, taking what the trainer's datasets feed it.
      reports: ``{"eval": report, "test": report, "train_seconds": s, ...}``, the run's
        metrics (``evaluation.metrics.classification_report`` per split).
    """
    predictions = predict_test_split(config, dataset, model)
    expected = reports.get(csv_format.TEST, {}).get("confusion_matrix")
    if expected is not None and not np.array_equal(np.asarray(expected), predictions.matrix):
        _LOGGER.warning(
            "the report's predictions of the test split differ from metrics.json's "
            "(%d misclassified there, %d here)",
            int(np.sum(expected) - np.trace(expected)),
            int(predictions.matrix.sum() - np.trace(predictions.matrix)),
        )
    folder = join(config.model_dir, layout.REPORT_THUMBS_DIR)
    delete(folder)  # a resumed run's page lists only its own images
    wanted = {m.sha256 for m in predictions.mistakes[:MAX_GALLERY]}
    thumbs = write_thumbnails(dataset.files[csv_format.TEST], wanted, folder)
    page = html_report.model_page(model_page_data(config, dataset, reports, predictions, thumbs))
    path = join(config.model_dir, html_report.REPORT_FILE)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(page)
    _LOGGER.info("wrote %s", path)
    return path
