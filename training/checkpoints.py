"""Resuming and checkpointing a training run in ``--model_dir``.

A run trains in stages (the head, then optionally fine-tuning). Each stage writes per-epoch
checkpoints under ``checkpoints/<stage>/``; when it ends (all epochs, or early stopping with the
best weights restored) its final weights and a ``state.json`` are saved, so rerunning the same
command does not train again but evaluates and exports the same model, and a larger ``--epochs``
continues training. ``config.json`` records the options a checkpoint was trained with and the
identity of its data (:func:`training.data.fingerprint`); a rerun whose model-shaping options,
training examples (``--examples_per_class``, ``--subsample_seed``), tuning (``--no_tune``) or
data differ is refused before anything in the model dir changes.

A tuned head (:mod:`training.tuning`) keeps its tuning record in ``checkpoints/stage1/`` next to
the head stage it chose: a rerun reuses the choice and resumes that stage, as for any run.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

import tensorflow as tf
import tf_keras

from schemas.cli import UsageError
from storage.fileops import join
from training.config import CLASSIFIER_ZSCORE, TrainConfig
from training.data import Dataset
from training.layout import CHECKPOINT_DIR, CONFIG_FILE, HISTORY_FILE, LOGS_DIR
from training.models import CROSS_ENTROPY

_LOGGER = logging.getLogger(__name__)
DATA_FINGERPRINT = "data_fingerprint"
STAGE_HEAD, STAGE_FINE_TUNE = "stage1", "stage2"
EVAL_LOSS = f"val_{CROSS_ENTROPY}"  # the eval split's plain cross-entropy, as Keras logs it
# Options that change the model's shape: a resumed run must match the checkpoint on these.
ARCHITECTURE_KEYS = (
    "features",
    "model",
    "hidden_units",
    "image_size",
    "channels",
    "batch_norm",
    "fine_tune",
    "fine_tune_layers",
    "classifier",
)
# What a config.json written before an option existed means by its absence.
LEGACY_VALUES = {"classifier": CLASSIFIER_ZSCORE, "tune": False}
# Options that choose the training examples: a resumed run must have drawn the same ones.
TRAINING_SET_KEYS = ("examples_per_class", "subsample_seed")
TUNING_FILE = "tuning.json"


def read_json(path: str, default: Any) -> Any:
    """The JSON value in ``path`` (local or remote), or ``default`` when there is no such file."""
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_json(path: str, value: Any) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2))


def run_record(config: TrainConfig, dataset: Dataset) -> dict[str, Any]:
    """What ``config.json`` records: the options, and the data (labels, backbone, counts, hash)."""
    record = {
        "train": config.to_json(),
        "labels": dataset.manifest.labels,
        "backbone": dataset.manifest.backbone.to_json(),
        "data_counts": dataset.counts,
        DATA_FINGERPRINT: dataset.fingerprint,
    }
    subsample = dataset.subsample_record(config)
    if subsample:
        record["subsample"] = subsample
    return record


def check_model_dir(config: TrainConfig, dataset: Dataset) -> bool:
    """Checks, changing nothing, that this run may use ``--model_dir``; True when it resumes.

    With ``--overwrite`` only the path is checked. A model dir whose ``config.json`` predates
    data fingerprints is resumed, with a warning, when its labels, backbone and split counts
    match: those catch relabelled or re-split data, and refusing would throw away a possibly
    long training; the fingerprint is recorded from then on.

    Raises:
      UsageError: the path is a file; the dir holds checkpoints without ``config.json``, an
        unreadable ``config.json``, or a model trained with other model-shaping options or on
        other data.
    """
    model_dir = config.model_dir
    if tf.io.gfile.exists(model_dir) and not tf.io.gfile.isdir(model_dir):
        raise UsageError(f"--model_dir {model_dir} is a file, not a directory")
    if config.overwrite:
        return False
    path = join(model_dir, CONFIG_FILE)
    fresh = "pass --overwrite to start fresh"
    if not tf.io.gfile.exists(path):
        if tf.io.gfile.isdir(join(model_dir, CHECKPOINT_DIR)):
            raise UsageError(
                f"--model_dir {model_dir} holds {CHECKPOINT_DIR}/ but no {CONFIG_FILE}, so what "
                f"they were trained on is unknown; {fresh}"
            )
        return False
    try:
        record = read_json(path, {})
        previous = dict(record["train"])
    except (ValueError, KeyError, TypeError) as e:
        raise UsageError(
            f"--model_dir: {path} is not a hubflow-train config ({e}); {fresh}"
        ) from None
    current = config.to_json()
    for key, value in LEGACY_VALUES.items():
        previous.setdefault(key, value)
    changed = [k for k in ARCHITECTURE_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise UsageError(
            f"--model_dir {model_dir} holds a model trained with other "
            f"{', '.join('--' + k for k in changed)}; {fresh}"
        )
    changed = [k for k in TRAINING_SET_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise UsageError(
            f"--model_dir {model_dir} holds a model trained on other train examples "
            f"({', '.join(f'--{k} {previous.get(k)}' for k in changed)}); {fresh}"
        )
    if bool(previous["tune"]) != config.tune:
        was = "a head tuned on eval" if previous["tune"] else "a model trained without tuning"
        resume = "drop --no_tune" if previous["tune"] else "add --no_tune"
        raise UsageError(f"--model_dir {model_dir} holds {was}; {resume} to resume it, or {fresh}")
    difference = _data_difference(record, run_record(config, dataset))
    if difference:
        raise UsageError(
            f"--model_dir {model_dir} holds a model trained on other data than --data_dir "
            f"{config.data_dir} ({difference}); {fresh}"
        )
    if DATA_FINGERPRINT not in record:
        _LOGGER.warning(
            "%s has no data fingerprint (written by an earlier hubflow); its labels, backbone "
            "and split counts match --data_dir, so the run resumes",
            path,
        )
    _LOGGER.info("resuming the run in %s (same data and model-shaping options)", model_dir)
    return True


def _data_difference(previous: dict[str, Any], current: dict[str, Any]) -> str | None:
    """How the data of two run records differ, in a few words; None when they match."""
    old, new = previous.get("labels") or [], current["labels"]
    if len(old) != len(new):
        return f"{len(old)} labels in the model, {len(new)} in the data"
    for i, (a, b) in enumerate(zip(old, new, strict=True)):
        if a != b:
            return f"label {i} is {a!r} in the model, {b!r} in the data"
    if previous.get("backbone") != current["backbone"]:
        was = (previous.get("backbone") or {}).get("name")
        return f"backbone {was} in the model, {current['backbone']['name']} in the data"
    if previous.get("data_counts") != current["data_counts"]:
        counts = previous.get("data_counts")
        return f"split counts {counts} in the model, {current['data_counts']} in the data"
    if previous.get(DATA_FINGERPRINT, current[DATA_FINGERPRINT]) != current[DATA_FINGERPRINT]:
        return "same labels and counts, other content: another preprocess run or other shards"
    return None


def stage_dir(model_dir: str, stage: str) -> str:
    return join(model_dir, CHECKPOINT_DIR, stage)


def latest_checkpoint(directory: str) -> tuple[str | None, int]:
    """The newest per-epoch checkpoint of a stage and its epoch, or ``(None, 0)``."""
    latest = tf.train.latest_checkpoint(directory) if tf.io.gfile.isdir(directory) else None
    if not latest:
        return None, 0
    match = re.search(r"ckpt-(\d+)$", latest)
    return latest, int(match.group(1)) if match else 0


def has_checkpoint(model_dir: str, stage: str) -> bool:
    return latest_checkpoint(stage_dir(model_dir, stage))[0] is not None


def read_tuning(model_dir: str) -> dict | None:
    """The tuning record of the head stage in ``model_dir``, None when there is none (or a run
    was killed while writing it: the head is then tuned again)."""
    try:
        return read_json(join(stage_dir(model_dir, STAGE_HEAD), TUNING_FILE), None)
    except ValueError:
        return None


def write_tuning(model_dir: str, record: dict) -> None:
    """Records the head's tuning before the chosen head stage trains (and checkpoints)."""
    directory = stage_dir(model_dir, STAGE_HEAD)
    tf.io.gfile.makedirs(directory)
    write_json(join(directory, TUNING_FILE), record)


def _keep_epochs(history: dict, stage: str, epochs: int) -> None:
    """Drops the epochs of ``stage`` beyond its first ``epochs`` from ``history`` (in place)."""
    stages = history.get("stage", [])
    keep, seen = [], 0
    for i, name in enumerate(stages):
        if name == stage:
            seen += 1
            if seen > epochs:
                continue
        keep.append(i)
    if len(keep) < len(stages):
        for key, values in history.items():
            history[key] = [values[i] for i in keep if i < len(values)]


def early_stopping(patience: int) -> tf_keras.callbacks.EarlyStopping:
    """Stops on the eval loss (cross-entropy alone: no label smoothing, no L2 term, so runs with
    other settings compare), restoring the best epoch's weights."""
    return tf_keras.callbacks.EarlyStopping(
        monitor=EVAL_LOSS, patience=patience, restore_best_weights=True
    )


def fit_stage(model, config, train_ds, eval_ds, *, stage: str, epochs: int, class_weight, history):
    """Fits one stage with per-epoch checkpoints, resuming from this stage's last one.

    A finished stage is not trained again: its final weights are loaded. Each epoch is appended
    to ``history`` (a Keras ``History.history``-style dict with a ``stage`` list) and written to
    ``history.json`` as it ends, so a killed run's epochs are not lost on resume.
    """
    directory = stage_dir(config.model_dir, stage)
    final = join(directory, "final", "weights")
    state = read_json(join(directory, "state.json"), None)
    if state and (state["stopped_early"] or state["epochs"] >= epochs):
        model.load_weights(final)
        _LOGGER.info("%s already finished (%d epochs): reusing its weights", stage, state["epochs"])
        return
    latest, initial_epoch = latest_checkpoint(directory)
    if latest:
        model.load_weights(latest)
        _LOGGER.info("resuming %s from %s (epoch %d)", stage, latest, initial_epoch)
    _keep_epochs(history, stage, initial_epoch)  # a killed run may have logged one more
    stopper = early_stopping(config.patience)
    history_path = join(config.model_dir, HISTORY_FILE)

    def log_epoch(epoch, logs):  # before the checkpoint: a resume never loses an epoch
        for key, value in (logs or {}).items():
            history.setdefault(key, []).append(float(value))
        history.setdefault("stage", []).append(stage)
        write_json(history_path, history)

    callbacks = [
        tf_keras.callbacks.LambdaCallback(on_epoch_end=log_epoch),
        tf_keras.callbacks.ModelCheckpoint(
            join(directory, "ckpt-{epoch:04d}"), save_weights_only=True
        ),
        stopper,
        tf_keras.callbacks.TensorBoard(join(config.model_dir, LOGS_DIR, stage)),
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
    model.save_weights(final)
    done = initial_epoch + len(fitted.epoch)
    write_json(
        join(directory, "state.json"),
        {"epochs": done, "stopped_early": stopper.stopped_epoch > 0},
    )
