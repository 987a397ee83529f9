"""Tuning the embedding head on eval: a few candidates, trained in memory, chosen by eval loss.

Head training on stored embeddings takes seconds, so by default the trainer fits each of
:data:`training.config.TUNING_CANDIDATES` (settings of ``--classifier`` and ``--l2``; every
other option as configured) and keeps the one with the lowest eval loss, the eval split's plain
cross-entropy (no label smoothing, no L2 term, so candidates compare). Each candidate is the
trainer's own head (:func:`training.models.embedding_head`,
:func:`training.models.compile_model`) fitted with early stopping on that loss, on the
embeddings read once into memory and batched by :func:`training.data.batches`, the tail of the
trainer's own input pipeline: no TFRecord is read per candidate, no checkpoint or TensorBoard
log is written.

The chosen settings then train the head stage of the run as any head trains (per-epoch
checkpoints, resume, history), with the same seed, batches and starting point as the candidate:
the model evaluated and exported is the candidate's own, which a test holds to its recorded eval
loss. Training it again costs one more head fit; it keeps what a run in ``--model_dir`` promises
(a killed run resumes from its last epoch), and a tuned run is the run ``--no_tune`` with the
chosen flags gives.

A tuned flag given on the command line (``--classifier``, ``--l2``) holds in every candidate;
candidates that became the same are tried once, and when one is left nothing is tuned.
``--no_tune`` trains one head with the given flags (``--classifier zscore --l2 0`` unless
given). The record (the candidates, their eval loss and accuracy, epochs and seconds, and the
choice) is kept in the head stage's checkpoint dir, so a resumed run reuses the choice, and goes
to ``metrics.json`` as ``tuning``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import numpy as np
import tensorflow as tf
import tf_keras

from schemas import csv_format
from training import checkpoints, data, models
from training.config import TrainConfig, tuning_candidates

_LOGGER = logging.getLogger(__name__)
METRICS_KEY = "tuning"
EVAL_BATCH = 4096
# The options every candidate shares, recorded with the tuning.
COMMON = (
    "dropout",
    "label_smoothing",
    "learning_rate",
    "optimizer",
    "lr_schedule",
    "hidden_units",
    "batch_size",
    "epochs",
    "patience",
    "class_weight",
    "seed",
)


@dataclasses.dataclass
class Tuning:
    """The outcome: the run's config with the chosen settings, and what ``metrics.json`` shows."""

    config: TrainConfig
    record: dict[str, Any]


def candidates(config: TrainConfig) -> list[dict[str, Any]]:
    """The settings to try for ``config``: a flag given on the command line holds in all."""
    return tuning_candidates({name: getattr(config, name) for name in config.tune_fixed})


def tune_head(config: TrainConfig, dataset: data.Dataset, resumed: bool) -> Tuning | None:
    """Chooses the head's settings on eval (or reuses the choice of the run being resumed).

    Returns None, training one head with the given flags, when the train and eval embeddings
    do not fit in the trainer's in-memory budget (:data:`training.data.CACHE_LIMIT_BYTES`).
    """
    previous = checkpoints.read_tuning(config.model_dir) if resumed else None
    if previous:
        _LOGGER.info("reusing the tuning of the run in %s", config.model_dir)
        _warn_if_flags_differ(config, previous["chosen"])
        return Tuning(dataclasses.replace(config, **previous["chosen"]), previous)
    train_rows = dataset.examples(csv_format.TRAIN) * (1 + dataset.views)
    examples = dataset.examples(csv_format.TRAIN) + dataset.examples(csv_format.EVAL)
    rows = train_rows + dataset.examples(csv_format.EVAL)
    if rows * 4 * dataset.manifest.backbone.embedding_dim > data.CACHE_LIMIT_BYTES:
        _LOGGER.warning(
            "%d train and eval embeddings do not fit in memory to tune the head: training one "
            "head with the given flags, as --no_tune does",
            examples,
        )
        return None
    started, cpu = time.monotonic(), time.process_time()
    train = data.embedding_arrays(config, dataset, csv_format.TRAIN, views=True)
    evaluation = data.embedding_arrays(config, dataset, csv_format.EVAL)
    results = []
    for params in candidates(config):
        result = fit_candidate(dataclasses.replace(config, **params), dataset, train, evaluation)
        results.append({"params": params, **result})
        _LOGGER.info(
            "candidate %s: eval loss %.4f, eval accuracy %.4f, %d epochs, %.1f s",
            _describe(params),
            result["eval_loss"],
            result["eval_accuracy"],
            result["epochs"],
            result["seconds"],
        )
    best = min(range(len(results)), key=lambda i: results[i]["eval_loss"])  # first of ties
    chosen = results[best]["params"]
    record = {
        "chosen": chosen,
        "chosen_index": best,
        "eval_loss": results[best]["eval_loss"],
        "fixed": {name: getattr(config, name) for name in config.tune_fixed},
        "common": {name: config.to_json()[name] for name in COMMON},
        "candidates": results,
        "train_examples": len(train[1]),
        "eval_examples": len(evaluation[1]),
        "seconds": round(time.monotonic() - started, 2),
        "cpu_seconds": round(time.process_time() - cpu, 2),
    }
    _LOGGER.info("tuned head: %s", summary_line(record))
    checkpoints.write_tuning(config.model_dir, record)
    return Tuning(dataclasses.replace(config, **chosen), record)


def fit_candidate(
    config: TrainConfig,
    dataset: data.Dataset,
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
) -> dict[str, Any]:
    """Fits one head on in-memory embeddings as the head stage would; its eval results.

    ``train`` may hold each example's centre and views (``[N, 1 + K, D]``): the batches then
    sample one per example and epoch, as the head stage's do (:func:`training.data.batches`).
    """
    return fit_head(config, dataset, train, evaluation)[1]


def fit_head(
    config: TrainConfig,
    dataset: data.Dataset,
    train: tuple[np.ndarray, np.ndarray],
    evaluation: tuple[np.ndarray, np.ndarray],
) -> tuple[tf_keras.Model, dict[str, Any]]:
    """:func:`fit_candidate`'s head (with its best-eval-loss weights restored) and results."""
    started = time.monotonic()
    num_classes = len(dataset.manifest.labels)
    tf_keras.utils.set_random_seed(config.seed)  # the trainer seeds, then builds its datasets
    train_ds = data.batches(
        tf.data.Dataset.from_tensor_slices(train),
        config,
        training=True,
        num_examples=len(train[1]),
    ).prefetch(data.AUTOTUNE)
    # Evaluated in one large batch per epoch: the eval loss is the same mean, and a few-label
    # run (one train step per epoch) would otherwise spend most of its epochs evaluating.
    eval_ds = tf.data.Dataset.from_tensor_slices(evaluation).batch(EVAL_BATCH).cache()
    mean, std = dataset.normalization
    centre = train[0][:, 0] if train[0].ndim == 3 else train[0]  # the views' is not the start
    start = models.start_kernel(config, centre, train[1], num_classes)
    head = models.embedding_head(
        dataset.manifest.backbone.embedding_dim, num_classes, mean, std, config, start
    )
    steps = math.ceil(len(train[1]) / config.batch_size) * config.epochs
    models.compile_model(head, config, num_classes, config.learning_rate, steps)
    class_weight = data.class_weights(dataset) if config.class_weight == "balanced" else None
    fitted = head.fit(
        train_ds,
        validation_data=eval_ds,
        epochs=config.epochs,
        class_weight=class_weight,
        callbacks=[checkpoints.early_stopping(config.patience)],
        verbose=0,
    )
    losses = fitted.history[checkpoints.EVAL_LOSS]
    best = int(np.argmin(losses))  # the epoch whose weights early stopping restored
    return head, {
        "eval_loss": float(losses[best]),
        "eval_accuracy": float(fitted.history["val_accuracy"][best]),
        "best_epoch": best + 1,
        "epochs": len(losses),
        "seconds": round(time.monotonic() - started, 2),
    }


def _describe(params: dict[str, Any]) -> str:
    return ", ".join(f"{name} {_value(value)}" for name, value in params.items())


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def summary_line(record: dict[str, Any]) -> str:
    """One line: the choice, its eval loss, and how many candidates it beat in how long."""
    fixed = record.get("fixed") or {}
    note = f"; fixed on the command line: {_describe(fixed)}" if fixed else ""
    return (
        f"{_describe(record['chosen'])} (eval loss {record['eval_loss']:.4f}, best of "
        f"{len(record['candidates'])} candidates, {record['seconds']:.1f} s{note})"
    )


def _warn_if_flags_differ(config: TrainConfig, chosen: dict[str, Any]) -> None:
    for name in config.tune_fixed:
        if name in chosen and chosen[name] != getattr(config, name):
            _LOGGER.warning(
                "--%s %s: the run being resumed tuned it to %s and keeps that; pass --overwrite "
                "to tune again",
                name,
                _value(getattr(config, name)),
                _value(chosen[name]),
            )
