"""Entry point of the trainer: ``python -m training.task`` / ``hubflow-train``.

Reads a preprocess output dir, trains (head on embeddings, head on images with optional
augmentation and fine-tuning, or a small net from scratch), evaluates on eval and test, and
exports a hermetic serving SavedModel. Rerunning the same command resumes from the last
checkpoint in ``--model_dir``; ``--overwrite`` starts fresh.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence

import numpy as np
import tensorflow as tf
import tf_keras

from schemas import csv_format, features
from schemas import manifest as manifest_lib
from training import data, evaluate, export, models, schedules
from training.config import PROG, TrainConfig, UsageError, parse_config

_LOGGER = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"
STAGE_HEAD, STAGE_FINE_TUNE = "stage1", "stage2"
# Options that change the model's shape: a resumed run must match the checkpoint on these.
_ARCHITECTURE_KEYS = (
    "features",
    "model",
    "hidden_units",
    "image_size",
    "channels",
    "batch_norm",
    "fine_tune",
    "fine_tune_layers",
)


@dataclasses.dataclass
class TrainResult:
    """What a run produced (returned to callers such as tests and the demo)."""

    model: tf_keras.Model
    export_dir: str
    metrics: dict
    history: dict


def strategy_kind(tf_config: dict, num_gpus: int) -> str:
    """``multi_worker`` when TF_CONFIG lists several workers (e.g. a Vertex AI multi-worker job),
    ``mirrored`` for several local GPUs, ``default`` otherwise."""
    cluster = tf_config.get("cluster", {})
    if len(cluster.get("worker", [])) + len(cluster.get("chief", [])) > 1:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "default"


def choose_strategy() -> tf.distribute.Strategy:
    """The tf.distribute strategy for this environment (see :func:`strategy_kind`)."""
    kind = strategy_kind(
        json.loads(os.environ.get("TF_CONFIG", "{}")), len(tf.config.list_logical_devices("GPU"))
    )
    _LOGGER.info("distribution strategy: %s", kind)
    if kind == "multi_worker":
        return tf.distribute.MultiWorkerMirroredStrategy()
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.get_strategy()


@dataclasses.dataclass
class _Data:
    manifest: manifest_lib.Manifest
    files: dict[str, list[str]]
    counts: dict[str, int]


def load_data(config: TrainConfig) -> _Data:
    """Validates the data dir before any training starts.

    Raises:
      UsageError: missing/empty data dir, incompatible manifest, an empty split, images needed
        but not stored, or a corrupt TFRecord (naming the file).
    """
    if not tf.io.gfile.isdir(config.data_dir):
        raise UsageError(f"--data_dir {config.data_dir} does not exist")
    try:
        manifest = manifest_lib.read_manifest(config.data_dir)
    except ValueError as e:
        raise UsageError(f"--data_dir: {e}") from None
    files, counts = {}, {}
    for split in csv_format.SPLITS:
        files[split] = data.split_files(config.data_dir, split)
        counts[split] = data.count_records(files[split])
        if counts[split] == 0:
            raise UsageError(
                f"--data_dir: the {split} split has no examples; rerun hubflow-preprocess with "
                f"more images or a larger --{split}_fraction"
                if split != csv_format.TRAIN
                else f"--data_dir: the {split} split has no examples"
            )
    if len(manifest.labels) < 2:
        raise UsageError(f"--data_dir: a classifier needs at least 2 labels, got {manifest.labels}")
    if config.uses_images:
        spec = {features.IMAGE_ENCODED: tf.io.FixedLenFeature([], tf.string, default_value="")}
        first = next(iter(tf.data.TFRecordDataset(files[csv_format.TRAIN][:1], "GZIP")))
        if not tf.io.parse_single_example(first, spec)[features.IMAGE_ENCODED].numpy():
            raise UsageError("--features image: this dataset was written without images")
    return _Data(manifest, files, counts)


def _prepare_model_dir(config: TrainConfig) -> bool:
    """Creates the model dir; returns True when an earlier run's checkpoints are resumed."""
    path = os.path.join(config.model_dir, "config.json")
    if config.overwrite and tf.io.gfile.exists(config.model_dir):
        tf.io.gfile.rmtree(config.model_dir)
    tf.io.gfile.makedirs(config.model_dir)
    if not tf.io.gfile.exists(path):
        return False
    with tf.io.gfile.GFile(path) as f:
        previous = json.load(f)["train"]
    current = config.to_json()
    changed = [k for k in _ARCHITECTURE_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise UsageError(
            f"--model_dir {config.model_dir} holds a model trained with other "
            f"{', '.join('--' + k for k in changed)}; pass --overwrite to start fresh"
        )
    return True


def _loss(num_classes: int, label_smoothing: float):
    if label_smoothing == 0:
        return tf_keras.losses.SparseCategoricalCrossentropy()

    def smoothed(y_true, y_pred):
        y = tf.one_hot(tf.cast(tf.reshape(y_true, [-1]), tf.int32), num_classes)
        return tf_keras.losses.categorical_crossentropy(y, y_pred, label_smoothing=label_smoothing)

    return smoothed


def _optimizer(name: str, learning_rate):
    if name == "sgd":
        return tf_keras.optimizers.SGD(learning_rate, momentum=0.9)
    if name == "rmsprop":
        return tf_keras.optimizers.RMSprop(learning_rate)
    return tf_keras.optimizers.Adam(learning_rate)


def _compile(model, config: TrainConfig, num_classes: int, learning_rate: float, steps: int):
    k = min(5, num_classes)
    model.compile(
        optimizer=_optimizer(
            config.optimizer, schedules.make_schedule(config.lr_schedule, learning_rate, steps)
        ),
        loss=_loss(num_classes, config.label_smoothing),
        metrics=[
            tf_keras.metrics.SparseCategoricalAccuracy(name="accuracy"),
            tf_keras.metrics.SparseTopKCategoricalAccuracy(k=k, name="top_k_accuracy"),
        ],
    )


def _latest_checkpoint(directory: str) -> tuple[str | None, int]:
    latest = tf.train.latest_checkpoint(directory) if tf.io.gfile.isdir(directory) else None
    if not latest:
        return None, 0
    match = re.search(r"ckpt-(\d+)$", latest)
    return latest, int(match.group(1)) if match else 0


def _fit(model, config, train_ds, eval_ds, *, stage: str, epochs: int, class_weight, history):
    """Fits one stage with per-epoch checkpoints, resuming from this stage's last one.

    When a stage ends (all epochs, or early stopping with the best weights restored) its final
    weights and a ``state.json`` are saved, so rerunning the same command does not train again
    but evaluates and exports the same model; a larger ``--epochs`` continues training.
    """
    directory = os.path.join(config.model_dir, CHECKPOINT_DIR, stage)
    final = os.path.join(directory, "final", "weights")
    state = _read_json(os.path.join(directory, "state.json"), None)
    if state and (state["stopped_early"] or state["epochs"] >= epochs):
        model.load_weights(final)
        _LOGGER.info("%s already finished (%d epochs): reusing its weights", stage, state["epochs"])
        return
    latest, initial_epoch = _latest_checkpoint(directory)
    if latest:
        model.load_weights(latest)
        _LOGGER.info("resuming %s from %s (epoch %d)", stage, latest, initial_epoch)
    stopper = tf_keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, restore_best_weights=True
    )
    callbacks = [
        tf_keras.callbacks.ModelCheckpoint(
            os.path.join(directory, "ckpt-{epoch:04d}"), save_weights_only=True
        ),
        stopper,
        tf_keras.callbacks.TensorBoard(os.path.join(config.model_dir, "logs", stage)),
    ]
    fitted = model.fit(
        train_ds,
        validation_data=eval_ds,
        epochs=epochs,
        initial_epoch=initial_epoch,
        class_weight=class_weight,
        callbacks=callbacks,
        verbose=2,
    )
    for key, values in fitted.history.items():
        history.setdefault(key, []).extend(float(v) for v in values)
    history.setdefault("stage", []).extend([stage] * len(fitted.epoch))
    model.save_weights(final)
    done = initial_epoch + len(fitted.epoch)
    _write_json(
        os.path.join(directory, "state.json"),
        {"epochs": done, "stopped_early": stopper.stopped_epoch > 0},
    )


def _predict(model, dataset) -> tuple[np.ndarray, np.ndarray]:
    labels, probabilities = [], []
    for x, y in dataset:
        probabilities.append(model(x, training=False).numpy())
        labels.append(y.numpy())
    return np.concatenate(labels), np.concatenate(probabilities)


def _read_json(path: str, default):
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def _write_json(path: str, value) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2))


def _write_report(model_dir: str, reports: dict, labels: list[str], history: dict) -> None:
    """metrics.json and the two plots; rendered locally, then copied when model_dir is remote."""
    remote = "://" in model_dir
    local = tempfile.mkdtemp(prefix="hubflow-report-") if remote else model_dir
    evaluate.write_metrics(os.path.join(local, "metrics.json"), reports)
    evaluate.plot_confusion_matrix(
        os.path.join(local, "confusion_matrix.png"),
        reports[csv_format.TEST]["confusion_matrix"],
        labels,
        "test split",
    )
    evaluate.plot_training_curves(os.path.join(local, "training_curves.png"), history)
    if remote:
        for name in ("metrics.json", "confusion_matrix.png", "training_curves.png"):
            tf.io.gfile.copy(os.path.join(local, name), f"{model_dir.rstrip('/')}/{name}", True)
        shutil.rmtree(local, ignore_errors=True)


def train(config: TrainConfig) -> TrainResult:
    """Trains, evaluates and exports; the whole job behind the CLI.

    Raises:
      UsageError: on bad input, before training starts.
    """
    dataset = load_data(config)
    manifest = dataset.manifest
    resumed = _prepare_model_dir(config)
    num_classes = len(manifest.labels)
    tf_keras.utils.set_random_seed(config.seed)
    _write_json(
        os.path.join(config.model_dir, "config.json"),
        {
            "train": config.to_json(),
            "labels": manifest.labels,
            "backbone": manifest.backbone.to_json(),
            "data_counts": dataset.counts,
        },
    )
    with tf.io.gfile.GFile(os.path.join(config.model_dir, export.LABELS_FILE), "w") as f:
        f.write("".join(f"{label}\n" for label in manifest.labels))

    augmenter = None
    if config.augment:
        from training import augment

        augmenter = augment.make_augmenter(
            augment.AugmentConfig(
                crop=config.crop,
                flip=config.flip,
                brightness=augment.AugmentConfig.brightness if config.brightness else 0.0,
                contrast=augment.AugmentConfig.contrast if config.contrast else 0.0,
                rotation=augment.AugmentConfig.rotation if config.rotation else 0.0,
                zoom=augment.AugmentConfig.zoom if config.zoom else 0.0,
            ),
            seed=config.seed,
        )
    train_ds, eval_ds, test_ds = (
        data.make_dataset(
            dataset.files[split],
            manifest,
            config,
            training=split == csv_format.TRAIN,
            augmenter=augmenter,
            num_examples=dataset.counts[split],
        )
        for split in csv_format.SPLITS
    )
    steps_per_epoch = math.ceil(dataset.counts[csv_format.TRAIN] / config.batch_size)
    class_weight = data.class_weights(manifest) if config.class_weight == "balanced" else None
    preprocess, image_shape = data.image_preprocessor(config, manifest)
    decode = data.decode_batch(preprocess, image_shape)

    history_path = os.path.join(config.model_dir, "history.json")
    history = _read_json(history_path, {}) if resumed else {}
    strategy = choose_strategy()
    started = time.monotonic()
    with strategy.scope():
        if config.from_scratch:
            model = models.scratch_model(num_classes, image_shape, config)
            head = None
        else:
            mean, std = data.embedding_normalization(
                config.data_dir, manifest.backbone.embedding_dim
            )
            head = models.embedding_head(
                manifest.backbone.embedding_dim, num_classes, mean, std, config
            )
            if config.uses_images:
                model = models.image_classifier(manifest.backbone, head)
            else:
                model = head
        _compile(model, config, num_classes, config.learning_rate, steps_per_epoch * config.epochs)
    model.summary(print_fn=_LOGGER.info)
    fine_tune_dir = os.path.join(config.model_dir, CHECKPOINT_DIR, STAGE_FINE_TUNE)
    resuming_fine_tune = config.fine_tune and _latest_checkpoint(fine_tune_dir)[0] is not None
    if not resuming_fine_tune:
        _fit(
            model,
            config,
            train_ds,
            eval_ds,
            stage=STAGE_HEAD,
            epochs=config.epochs,
            class_weight=class_weight,
            history=history,
        )
    if config.fine_tune:
        with strategy.scope():
            model = models.fine_tune_model(manifest.backbone, head, config)
            _compile(
                model,
                config,
                num_classes,
                config.fine_tune_learning_rate,
                steps_per_epoch * config.fine_tune_epochs,
            )
        _fit(
            model,
            config,
            train_ds,
            eval_ds,
            stage=STAGE_FINE_TUNE,
            epochs=config.fine_tune_epochs,
            class_weight=class_weight,
            history=history,
        )
    train_seconds = time.monotonic() - started
    _write_json(history_path, history)

    reports = {}
    for split, ds in ((csv_format.EVAL, eval_ds), (csv_format.TEST, test_ds)):
        y_true, probabilities = _predict(model, ds)
        reports[split] = evaluate.classification_report(y_true, probabilities, manifest.labels)
    reports["train_seconds"] = round(train_seconds, 2)
    _write_report(config.model_dir, reports, manifest.labels, history)

    serving_model = model
    if not config.uses_images:  # stitch the embedding head to its backbone: callers send bytes
        serving_model = models.image_classifier(manifest.backbone, head)
    export_dir = export.export(serving_model, manifest.labels, decode, config.model_dir)
    return TrainResult(model=model, export_dir=export_dir, metrics=reports, history=history)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("training").setLevel(logging.INFO)
    try:
        config = parse_config(argv)
        result = train(config)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    test = result.metrics[csv_format.TEST]
    print(f"test accuracy: {test['accuracy']:.4f} ({test['examples']} examples)")
    print(evaluate.format_report_table(test))
    print(f"export: {result.export_dir}")
    print(f"metrics, plots, history: {config.model_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
