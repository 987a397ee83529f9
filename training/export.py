"""Hermetic serving export in TF Serving's versioned layout: ``<model_dir>/export/<n>/``.

The signature is the contract in :mod:`schemas.serving`: encoded image bytes in (JPEG, PNG, GIF
or BMP), labelled probabilities and the top-k classes out. Decoding, resizing, the backbone (its
variables copied in), the normalisation and the head are all inside; the labels are a constant
of the graph. Nothing outside the export dir is needed to serve.

A version is written to ``export/<n>.tmp/`` and then moved to ``export/<n>/``: locally one
rename; on ``gs://`` (no folder rename) file by file with ``saved_model.pb``
(:data:`training.layout.EXPORT_MARKER`) last, so a reader that finds it finds the whole version.
A version without it is a copy a killed run left unfinished; the next export replaces it.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable

import tensorflow as tf
import tf_keras

from schemas import serving
from schemas.manifest import labels_text
from storage.fileops import delete, join, move
from training.layout import EXPORT_MARKER

_LOGGER = logging.getLogger(__name__)


class _Untracked:
    """Holds an object out of reach of TensorFlow's object-graph tracking."""

    def __init__(self, value):
        self.value = value


class ServingModule(tf.Module):
    """Bytes in, labelled probabilities out."""

    def __init__(self, model: tf_keras.Model, labels: list[str], decode: Callable):
        super().__init__()
        # Only the variables are tracked, not the Keras object: the export then holds the
        # serving function alone and loads several times faster (no Keras layer functions).
        self._model = _Untracked(model)
        self.variables_to_serve = list(model.variables)
        self._decode = decode
        self._labels = tf.constant(labels)
        self._k = serving.top_k(len(labels))

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=serving.INPUT_KEY)])
    def serve(self, image_bytes: tf.Tensor) -> dict[str, tf.Tensor]:
        probabilities = self._model.value(self._decode(image_bytes), training=False)
        top = tf.math.top_k(probabilities, k=self._k)
        return {
            serving.PROBABILITIES: probabilities,
            serving.CLASSES: tf.gather(self._labels, top.indices[:, 0]),
            serving.SCORES: top.values[:, 0],
            serving.TOP_K_CLASSES: tf.gather(self._labels, top.indices),
            serving.TOP_K_SCORES: top.values,
        }


def next_version_dir(model_dir: str) -> str:
    """``export/<n>`` with n one above the highest complete version (1 for the first)."""
    root = join(model_dir, serving.EXPORT_DIR)
    names = [n.rstrip("/") for n in tf.io.gfile.listdir(root)] if tf.io.gfile.isdir(root) else []
    versions = [
        int(n) for n in names if n.isdigit() and tf.io.gfile.exists(join(root, n, EXPORT_MARKER))
    ]
    return join(root, str(max(versions, default=0) + 1))


def export(
    model: tf_keras.Model,
    labels: list[str],
    decode: Callable,
    model_dir: str,
    preprocessing: dict | None = None,
) -> str:
    """Writes the serving SavedModel to the next ``export/<n>/`` (via ``export/<n>.tmp/``).

    Args:
      preprocessing: how the training images were normalised (``serving.PREPROCESSING_KEYS``),
        written to ``serving.PREPROCESSING_ASSET`` for batch prediction.
    """
    target = next_version_dir(model_dir)
    tmp = f"{target}.tmp"
    delete(tmp)  # left by a run killed while exporting
    delete(target)  # a killed run's unfinished copy (no EXPORT_MARKER)
    module = ServingModule(model, labels, decode)
    tf.saved_model.save(module, tmp, signatures={serving.SIGNATURE_NAME: module.serve})
    labels_path = join(tmp, serving.LABELS_ASSET)
    tf.io.gfile.makedirs(posixpath.dirname(labels_path))
    with tf.io.gfile.GFile(labels_path, "w") as f:
        f.write(labels_text(labels))
    if preprocessing is not None:
        with tf.io.gfile.GFile(join(tmp, serving.PREPROCESSING_ASSET), "w") as f:
            f.write(json.dumps(preprocessing, indent=2))
    move(tmp, target, last=(EXPORT_MARKER,))
    _LOGGER.info("exported %s", target)
    return target
