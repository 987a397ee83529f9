"""Resuming and checkpointing a training run in ``--model_dir``.

A run trains in stages (the head, then optionally fine-tuning). Each stage writes per-epoch
checkpoints under ``checkpoints/<stage>/``; when it ends (all epochs, or early stopping with the
best weights restored) its final weights and a ``state.json`` are saved, so rerunning the same
command does not train again but evaluates and exports the same model, and a larger ``--epochs``
continues training. ``config.json`` records the options a checkpoint was trained with; a rerun
whose model-shaping options differ is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

import tensorflow as tf
import tf_keras

from schemas.cli import UsageError
from training.config import TrainConfig

_LOGGER = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"
STAGE_HEAD, STAGE_FINE_TUNE = "stage1", "stage2"
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
)


def read_json(path: str, default: Any) -> Any:
    """The JSON value in ``path`` (local or remote), or ``default`` when there is no such file."""
    if not tf.io.gfile.exists(path):
        return default
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def write_json(path: str, value: Any) -> None:
    with tf.io.gfile.GFile(path, "w") as f:
        f.write(json.dumps(value, indent=2))


def prepare_model_dir(config: TrainConfig) -> bool:
    """Creates the model dir (emptied first with ``--overwrite``); True when a run is resumed.

    Raises:
      UsageError: the dir holds a model trained with other model-shaping options.
    """
    path = os.path.join(config.model_dir, CONFIG_FILE)
    if config.overwrite and tf.io.gfile.exists(config.model_dir):
        tf.io.gfile.rmtree(config.model_dir)
    tf.io.gfile.makedirs(config.model_dir)
    if not tf.io.gfile.exists(path):
        return False
    previous = read_json(path, {})["train"]
    current = config.to_json()
    changed = [k for k in ARCHITECTURE_KEYS if previous.get(k) != current.get(k)]
    if changed:
        raise UsageError(
            f"--model_dir {config.model_dir} holds a model trained with other "
            f"{', '.join('--' + k for k in changed)}; pass --overwrite to start fresh"
        )
    return True


def stage_dir(model_dir: str, stage: str) -> str:
    return os.path.join(model_dir, CHECKPOINT_DIR, stage)


def latest_checkpoint(directory: str) -> tuple[str | None, int]:
    """The newest per-epoch checkpoint of a stage and its epoch, or ``(None, 0)``."""
    latest = tf.train.latest_checkpoint(directory) if tf.io.gfile.isdir(directory) else None
    if not latest:
        return None, 0
    match = re.search(r"ckpt-(\d+)$", latest)
    return latest, int(match.group(1)) if match else 0


def has_checkpoint(model_dir: str, stage: str) -> bool:
    return latest_checkpoint(stage_dir(model_dir, stage))[0] is not None


def fit_stage(model, config, train_ds, eval_ds, *, stage: str, epochs: int, class_weight, history):
    """Fits one stage with per-epoch checkpoints, resuming from this stage's last one.

    A finished stage is not trained again: its final weights are loaded. New epochs are appended
    to ``history`` (a Keras ``History.history``-style dict with a ``stage`` list).
    """
    directory = stage_dir(config.model_dir, stage)
    final = os.path.join(directory, "final", "weights")
    state = read_json(os.path.join(directory, "state.json"), None)
    if state and (state["stopped_early"] or state["epochs"] >= epochs):
        model.load_weights(final)
        _LOGGER.info("%s already finished (%d epochs): reusing its weights", stage, state["epochs"])
        return
    latest, initial_epoch = latest_checkpoint(directory)
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
        tf_keras.callbacks.TensorBoard(os.path.join(config.model_dir, LOGS_DIR, stage)),
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
    write_json(
        os.path.join(directory, "state.json"),
        {"epochs": done, "stopped_early": stopper.stopped_epoch > 0},
    )
