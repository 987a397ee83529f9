"""Entry point of the trainer: ``python -m training.task`` / ``hubflow-train``.

Reads a preprocess output dir, trains (head on embeddings, tuned on eval by default
(:mod:`training.tuning`); head on images with optional augmentation and fine-tuning, exporting
the fine-tuned model only when it beats the head stage on eval; or a small net from scratch),
evaluates on eval and test, and exports a hermetic serving SavedModel. Rerunning the same
command resumes from the last checkpoint in ``--model_dir`` (:mod:`training.checkpoints`) when
it holds a model of the same data and architecture; ``--overwrite`` starts fresh, keeping the
previous model until the new export is complete (:mod:`training.layout`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from evaluation import metrics, plots
from evaluation.html_report import REPORT_FILE
from schemas import csv_format, serving
from schemas import manifest as manifest_lib
from schemas.cli import UsageError, configure_logging, report_usage_error
from storage.fileops import join
from storage.locks import DirLock
from training import (
    augment,
    checkpoints,
    cluster,
    data,
    export,
    layout,
    models,
    report,
    tflite,
    tuning,
)
from training.checkpoints import STAGE_FINE_TUNE, STAGE_HEAD
from training.config import CLASSIFIER_COSINE, PROG, TrainConfig, parse_config
from training.layout import CONFUSION_PNG, CURVES_PNG, METRICS_FILE

# Not __name__: under ``python -m training.task`` that is "__main__", outside the "training"
# logger whose INFO level configure_logging enables.
_LOGGER = logging.getLogger("training.task")
STAGES_KEY = "fine_tune"  # metrics.json: which stage's weights were exported, and why
SUBSAMPLE_KEY = "subsample"  # metrics.json: --examples_per_class, its seed and the draw
EXPORTED_HEAD, EXPORTED_FINE_TUNE = "head", "fine_tune"


@dataclasses.dataclass
class TrainResult:
    """What a run produced (returned to callers such as tests and the demo)."""

    model: tf_keras.Model
    export_dir: str
    metrics: dict
    history: dict


@dataclasses.dataclass
class _Models:
    """The model being trained, and the head alone (None for a from-scratch net)."""

    model: tf_keras.Model
    head: tf_keras.Model | None


def choose_strategy() -> tf.distribute.Strategy:
    """The tf.distribute strategy of this machine (:func:`training.cluster.strategy_kind`)."""
    kind = cluster.strategy_kind(len(tf.config.list_logical_devices("GPU")))
    _LOGGER.info("distribution strategy: %s", kind)
    return tf.distribute.MirroredStrategy() if kind == "mirrored" else tf.distribute.get_strategy()


def train(config: TrainConfig) -> TrainResult:
    """Trains, evaluates and exports; the whole job behind the CLI.

    Raises:
      UsageError: on bad input, before anything in ``--model_dir`` changes.
    """
    dataset = data.load(config)
    with DirLock(config.model_dir, PROG, "--model_dir", config.break_lock):
        layout.recover(config.model_dir)  # puts back what an interrupted run had moved aside
        resumed = checkpoints.check_model_dir(config, dataset)
        with layout.replacing(config.model_dir, overwrite=config.overwrite):
            return _train_and_export(config, dataset, resumed)


def _train_and_export(config: TrainConfig, dataset: data.Dataset, resumed: bool) -> TrainResult:
    _write_run_record(config, dataset)
    started = time.monotonic()
    tuned = tuning.tune_head(config, dataset, resumed) if config.tune else None
    if tuned:  # the head stage trains with the chosen settings, as the chosen candidate did
        config = tuned.config
    tf_keras.utils.set_random_seed(config.seed)
    splits = data.make_split_datasets(config, dataset, augment.trainer_augmenter(config))
    history_path = join(config.model_dir, layout.HISTORY_FILE)
    history = checkpoints.read_json(history_path, {}) if resumed else {}
    strategy = choose_strategy()
    built = _build(config, dataset, strategy)
    model, stages = _fit(config, dataset, splits, built, strategy, history)
    train_seconds = time.monotonic() - started
    checkpoints.write_json(history_path, history)
    reports = _evaluate(model, splits, dataset.manifest.labels)
    reports["train_seconds"] = round(train_seconds, 2)
    if tuned:
        reports[tuning.METRICS_KEY] = tuned.record
    if stages:
        reports[STAGES_KEY] = stages
    subsample = dataset.subsample_record(config)
    if subsample:
        reports[SUBSAMPLE_KEY] = subsample
    _write_report(config.model_dir, reports, dataset.manifest.labels, history)
    serving_model = _serving_model(config, dataset.manifest, model, built.head)
    export_dir = _export(config, dataset.manifest, serving_model)
    if config.export_tflite:  # model.tflite, measured against the export in metrics.json
        section = tflite.export_tflite(config, dataset, serving_model, export_dir)
        reports[tflite.METRICS_KEY] = section
        _write_report(config.model_dir, reports, dataset.manifest.labels, history)
    else:
        tflite.warn_if_stale(config.model_dir)
    report.write_model_report(config, dataset, model, reports)  # report.html: metrics, gallery
    return TrainResult(model=model, export_dir=export_dir, metrics=reports, history=history)


def _write_run_record(config: TrainConfig, dataset: data.Dataset) -> None:
    """``config.json`` (options and the data's identity) and ``labels.txt``."""
    record = checkpoints.run_record(config, dataset)
    checkpoints.write_json(join(config.model_dir, layout.CONFIG_FILE), record)
    path = join(config.model_dir, manifest_lib.LABELS_FILE)
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(manifest_lib.labels_text(dataset.manifest.labels))


def _steps_per_epoch(config: TrainConfig, dataset: data.Dataset) -> int:
    return math.ceil(dataset.examples(csv_format.TRAIN) / config.batch_size)


def _build(config: TrainConfig, dataset: data.Dataset, strategy) -> _Models:
    """The model of the first stage, compiled: a from-scratch net, a head, or head on backbone."""
    manifest = dataset.manifest
    num_classes = len(manifest.labels)
    _, image_shape = data.image_preprocessor(config, manifest)
    with strategy.scope():
        if config.from_scratch:
            built = _Models(models.scratch_model(num_classes, image_shape, config), None)
        else:
            dim = manifest.backbone.embedding_dim
            mean, std = dataset.normalization
            start = None
            if config.classifier == CLASSIFIER_COSINE:  # the train embeddings' class means
                train = data.embedding_arrays(config, dataset, csv_format.TRAIN)
                start = models.start_kernel(config, *train, num_classes)
            head = models.embedding_head(dim, num_classes, mean, std, config, start)
            model = models.image_classifier(manifest.backbone, head) if config.uses_images else head
            built = _Models(model, head)
        steps = _steps_per_epoch(config, dataset) * config.epochs
        models.compile_model(built.model, config, num_classes, config.learning_rate, steps)
    built.model.summary(print_fn=_LOGGER.info)
    return built


def _fit(
    config, dataset, splits, built: _Models, strategy, history: dict
) -> tuple[tf_keras.Model, dict | None]:
    """Runs the stages (head, then optionally fine-tuning).

    Returns the model to evaluate and export and, with ``--fine_tune``, which stage's weights
    that is: the fine-tuned model only when its eval loss is lower than the head stage's (so
    fine-tuning never makes the exported model worse on eval), else the head stage's.
    """
    class_weight = data.class_weights(dataset) if config.class_weight == "balanced" else None
    train_ds, eval_ds = splits[csv_format.TRAIN], splits[csv_format.EVAL]
    fit = dict(class_weight=class_weight, history=history)
    model = built.model
    # A finished stage is not trained again, only loaded: a resumed fine-tuning run reloads the
    # head stage's final weights here to compare against them.
    checkpoints.fit_stage(
        model, config, train_ds, eval_ds, stage=STAGE_HEAD, epochs=config.epochs, **fit
    )
    if not config.fine_tune:
        return model, None
    head_weights = built.head.get_weights()  # the fine-tuned model shares (and trains) the head
    head_loss = _eval_loss(model, eval_ds)
    with strategy.scope():
        fine_tuned = models.fine_tune_model(dataset.manifest.backbone, built.head, config)
        steps = _steps_per_epoch(config, dataset) * config.fine_tune_epochs
        models.compile_model(
            fine_tuned, config, len(dataset.manifest.labels), config.fine_tune_learning_rate, steps
        )
    checkpoints.fit_stage(
        fine_tuned,
        config,
        train_ds,
        eval_ds,
        stage=STAGE_FINE_TUNE,
        epochs=config.fine_tune_epochs,
        **fit,
    )
    fine_tuned_loss = _eval_loss(fine_tuned, eval_ds)
    stages = {
        "head_eval_loss": head_loss,
        # None when fine-tuning diverged (probabilities not finite): it is then never exported
        "fine_tune_eval_loss": fine_tuned_loss if math.isfinite(fine_tuned_loss) else None,
    }
    if fine_tuned_loss < head_loss:
        _LOGGER.info("exporting the fine-tuned model: %s", stages)
        return fine_tuned, {"exported_stage": EXPORTED_FINE_TUNE, **stages}
    _LOGGER.warning(
        "fine-tuning did not lower the eval loss (%.4f, head stage %.4f): exporting the head "
        "stage's weights",
        fine_tuned_loss,
        head_loss,
    )
    built.head.set_weights(head_weights)
    return model, {"exported_stage": EXPORTED_HEAD, **stages}


def _eval_loss(model, eval_ds) -> float:
    """The eval split's cross-entropy, as ``metrics.json`` reports it (inf if not finite)."""
    y_true, probabilities = predict(model, eval_ds)
    if not np.all(np.isfinite(probabilities)):
        return math.inf
    labels = [str(i) for i in range(probabilities.shape[1])]
    return float(metrics.classification_report(y_true, probabilities, labels)["loss"])


def predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    """True label indices and predicted probabilities over a ``(features, label)`` dataset."""
    labels, probabilities = [], []
    for x, y in dataset:
        probabilities.append(model(x, training=False).numpy())
        labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(probabilities)


def _evaluate(model, splits, labels: list[str]) -> dict:
    reports = {}
    for split in (csv_format.EVAL, csv_format.TEST):
        y_true, probabilities = predict(model, splits[split])
        reports[split] = metrics.classification_report(y_true, probabilities, labels)
    return reports


def _write_report(model_dir: str, reports: dict, labels: list[str], history: dict) -> None:
    """metrics.json and the two plots, written with tf.io.gfile (local, gs://, any filesystem)."""
    matrix = reports[csv_format.TEST]["confusion_matrix"]
    for name, content in (
        (METRICS_FILE, metrics.metrics_text(reports).encode()),
        (CONFUSION_PNG, plots.confusion_matrix_png(matrix, labels, "test split")),
        (CURVES_PNG, plots.training_curves_png(history)),
    ):
        with tf.io.gfile.GFile(join(model_dir, name), "wb") as f:
            f.write(content)


def _serving_model(config: TrainConfig, manifest, model, head) -> tf_keras.Model:
    """The model behind the exports: an embedding head is stitched to its backbone first."""
    if config.uses_images:
        return model
    return models.image_classifier(manifest.backbone, head)  # callers send images


def _export(config: TrainConfig, manifest, serving_model) -> str:
    """Exports the serving model (:func:`_serving_model`) with the image decoding in front."""
    preprocess, image_shape = data.image_preprocessor(config, manifest)
    decode = data.decode_batch(preprocess, image_shape)
    # The stored images' normalisation, so batch prediction can repeat it (missing in old data).
    normalisation = {
        k: manifest.options[k] for k in serving.PREPROCESSING_KEYS if k in manifest.options
    }
    return export.export(serving_model, manifest.labels, decode, config.model_dir, normalisation)


def summary_lines(reports: dict) -> list[str]:
    """What the run chose, for the printed summary: the tuned head, the exported stage, K."""
    lines = []
    subsample = reports.get(SUBSAMPLE_KEY)
    if subsample:
        lines.append(
            f"trained on {subsample['train_examples']} of {subsample['train_split_examples']} "
            f"train examples (--examples_per_class {subsample['examples_per_class']} "
            f"--subsample_seed {subsample['subsample_seed']})"
        )
    record = reports.get(tuning.METRICS_KEY)
    if record:
        lines.append(f"head tuned on eval: {tuning.summary_line(record)}")
    stages = reports.get(STAGES_KEY)
    if stages:
        tuned = stages["fine_tune_eval_loss"]
        lines.append(
            f"exported stage: {stages['exported_stage']} (eval loss: head stage "
            f"{stages['head_eval_loss']:.4f}, fine-tuned "
            f"{'not finite' if tuned is None else f'{tuned:.4f}'})"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    configure_logging("training", "backbones")
    try:
        config = parse_config(argv)
        if not cluster.should_train():  # a replica other than a cluster's primary: exit 0
            return 0
        result = train(config)
    except UsageError as e:
        return report_usage_error(PROG, e)
    test = result.metrics[csv_format.TEST]
    for line in summary_lines(result.metrics):
        print(line)
    print(f"test accuracy: {test['accuracy']:.4f} ({test['examples']} examples)")
    print(metrics.format_report_table(test))
    print(f"export: {result.export_dir}")
    print(f"metrics, plots, history: {config.model_dir}")
    print(f"report: {join(config.model_dir, REPORT_FILE)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
