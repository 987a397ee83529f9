"""The trainer's files in ``--model_dir``, and how ``--overwrite`` replaces them without loss.

The trainer owns the names in :data:`OUTPUTS` and nothing else: files of the user's that happen
to be in the dir (notes, data, a lock file) are never moved or deleted.

``--overwrite`` does not delete the previous model before training. :func:`set_aside` moves the
previous run's outputs into ``<model_dir>/.hubflow-previous/`` and then writes a marker
(``.complete``) there; :func:`discard` deletes that folder once the new export is complete, and
:func:`restore` moves the previous outputs back when the run fails. A run killed in between
(SIGKILL, out of memory) leaves the previous model readable in that folder, and the next run
settles it:

* the folder without its marker (killed while moving outputs aside or back): :func:`recover`
  moves its entries back, so the dir is as it was before that run;
* the folder with its marker (killed while training): the dir holds the killed run's outputs. A
  run that resumes them deletes the folder once its export is complete (the overwrite is then
  done); a new ``--overwrite`` run deletes the killed run's outputs and keeps the folder as its
  own previous model;
* the folder with a second marker, ``.discard`` (killed while :func:`discard` deleted it, which
  takes a while on ``gs://``, file by file): :func:`recover` finishes deleting it, and never
  moves what is left of the old model back over the new one.

Entries move with :mod:`storage.fileops`: one rename locally; file by file on ``gs://`` and
other object stores, where an export version's ``saved_model.pb`` (:data:`EXPORT_MARKER`) leaves
``<model_dir>/export/<n>/`` first and comes back last, so a reader that finds it finds the whole
version (the previous model's folder is complete only once its own marker is written).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import tensorflow as tf

from evaluation.html_report import REPORT_FILE
from schemas import serving
from schemas.cli import UsageError
from schemas.manifest import LABELS_FILE
from storage.fileops import delete, join, move

_LOGGER = logging.getLogger(__name__)
CONFIG_FILE = "config.json"
HISTORY_FILE = "history.json"
METRICS_FILE = "metrics.json"
CONFUSION_PNG = "confusion_matrix.png"
CURVES_PNG = "training_curves.png"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"
TFLITE_FILE = "model.tflite"  # --export_tflite; the labels are LABELS_FILE beside it
REPORT_THUMBS_DIR = "report_thumbs"  # thumbnails of REPORT_FILE's misclassified test images
# Everything a run writes into --model_dir; the only names --overwrite ever moves or deletes.
OUTPUTS = (
    CONFIG_FILE,
    HISTORY_FILE,
    LABELS_FILE,
    METRICS_FILE,
    CONFUSION_PNG,
    CURVES_PNG,
    CHECKPOINT_DIR,
    LOGS_DIR,
    serving.EXPORT_DIR,
    TFLITE_FILE,
    REPORT_FILE,
    REPORT_THUMBS_DIR,
)
# A version in export/<n>/ is complete once this file is there (hubflow-predict looks for it).
EXPORT_MARKER = tf.saved_model.SAVED_MODEL_FILENAME_PB
PREVIOUS_DIR = ".hubflow-previous"
COMPLETE_MARKER = ".complete"
DISCARD_MARKER = ".discard"  # written before PREVIOUS_DIR is deleted, deleted last


def present(model_dir: str) -> list[str]:
    """The names of :data:`OUTPUTS` that exist in ``model_dir``."""
    return [name for name in OUTPUTS if tf.io.gfile.exists(join(model_dir, name))]


def _previous(model_dir: str) -> tuple[str, str]:
    previous = join(model_dir, PREVIOUS_DIR)
    return previous, join(previous, COMPLETE_MARKER)


def recover(model_dir: str) -> None:
    """Moves back what a run killed while moving outputs aside (or back) left in PREVIOUS_DIR.

    A PREVIOUS_DIR that a killed run was deleting (:func:`discard`) is deleted instead.
    """
    previous, marker = _previous(model_dir)
    if not tf.io.gfile.isdir(previous):
        return
    if tf.io.gfile.exists(join(previous, DISCARD_MARKER)):
        delete(previous, last=(DISCARD_MARKER,))
        _LOGGER.info("finished deleting the previous model in %s", previous)
        return
    if tf.io.gfile.exists(marker):
        return
    for name in tf.io.gfile.listdir(previous):
        name = name.rstrip("/")
        move(join(previous, name), join(model_dir, name), last=(EXPORT_MARKER,))
    delete(previous)
    _LOGGER.warning("moved back the outputs an interrupted run had set aside in %s", previous)


def set_aside(model_dir: str) -> None:
    """Moves the previous run's outputs into PREVIOUS_DIR, then marks it complete."""
    recover(model_dir)
    previous, marker = _previous(model_dir)
    if tf.io.gfile.exists(marker):
        _LOGGER.warning(
            "%s holds the model from before an --overwrite run that did not finish: keeping it "
            "there and deleting that run's outputs",
            previous,
        )
        for name in present(model_dir):
            delete(join(model_dir, name), first=(EXPORT_MARKER,))
        return
    names = present(model_dir)
    if not names:
        return
    tf.io.gfile.makedirs(previous)
    for name in names:
        move(join(model_dir, name), join(previous, name), first=(EXPORT_MARKER,))
    with tf.io.gfile.GFile(marker, "w") as f:
        f.write("")  # GFile creates the file on the first write
    _LOGGER.info("the previous model stays in %s until the new export is complete", previous)


def restore(model_dir: str) -> None:
    """Deletes a failed run's outputs and moves the previous ones back from PREVIOUS_DIR."""
    previous, marker = _previous(model_dir)
    if not tf.io.gfile.exists(marker):
        return
    for name in present(model_dir):
        delete(join(model_dir, name), first=(EXPORT_MARKER,))
    tf.io.gfile.remove(marker)
    recover(model_dir)


def discard(model_dir: str) -> None:
    """Deletes the previous model set aside in PREVIOUS_DIR (the new one is complete)."""
    previous, marker = _previous(model_dir)
    if tf.io.gfile.exists(marker):
        with tf.io.gfile.GFile(join(previous, DISCARD_MARKER), "w") as f:
            f.write("")
        delete(previous, last=(DISCARD_MARKER,))
        _LOGGER.info("deleted the previous model from %s", previous)


@contextlib.contextmanager
def replacing(model_dir: str, overwrite: bool) -> Iterator[None]:
    """Creates ``model_dir`` for the body, which writes a model there.

    With ``overwrite`` the previous outputs are set aside first and put back if the body fails
    (any exception, KeyboardInterrupt included). When the body finishes, a previous model set
    aside by this run or by an interrupted ``--overwrite`` run is deleted.

    Raises:
      UsageError: ``model_dir`` cannot be created.
    """
    try:
        tf.io.gfile.makedirs(model_dir)
    except tf.errors.OpError as e:
        reason = " ".join(str(e.message).split())
        raise UsageError(f"--model_dir {model_dir} cannot be created: {reason}") from None
    if overwrite:
        set_aside(model_dir)
    try:
        yield
    except BaseException:
        if overwrite:
            try:
                restore(model_dir)
            except Exception:
                _LOGGER.exception("could not move the previous model back from %s", PREVIOUS_DIR)
        raise
    discard(model_dir)
