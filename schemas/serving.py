"""The serving contract of an exported hubflow model (``<model_dir>/export/<n>/``).

The export is a SavedModel in TF Serving's versioned layout. Its :data:`SIGNATURE_NAME`
signature takes :data:`INPUT_KEY` (``tf.string [None]``: encoded image bytes, so TF Serving's
REST ``{"b64": ...}`` works) and returns the :data:`OUTPUT_KEYS`. The labels are also written,
in the labels-file format of :mod:`schemas.manifest`, to :data:`LABELS_ASSET` inside the export. The trainer writes
exports to this contract and batch prediction (and anything else) reads them by it.
"""

from __future__ import annotations

import os

EXPORT_DIR = "export"  # <model_dir>/export/<n>/
SIGNATURE_NAME = "serving_default"
INPUT_KEY = "image_bytes"

# Outputs of the signature.
PROBABILITIES = "probabilities"  # float32 [N, C], in label-index order
CLASSES = "classes"  # string [N], the most probable label
SCORES = "scores"  # float32 [N], its probability
TOP_K_CLASSES = "top_k_classes"  # string [N, k], most probable first
TOP_K_SCORES = "top_k_scores"  # float32 [N, k]
OUTPUT_KEYS = (PROBABILITIES, CLASSES, SCORES, TOP_K_CLASSES, TOP_K_SCORES)

LABELS_ASSET = os.path.join("assets.extra", "labels.txt")

# How the training images were normalised before they were stored (preprocessing's
# --jpeg_quality, --max_image_side), as JSON: batch prediction normalises every image the same
# way before it calls the signature, so the model sees what it was trained on.
PREPROCESSING_ASSET = os.path.join("assets.extra", "preprocessing.json")
PREPROCESSING_KEYS = ("jpeg_quality", "max_image_side")

# The most classes the top-k outputs list.
MAX_TOP_K = 5

# The signature decodes the bytes with tf.io.decode_image: JPEG, PNG, GIF (first frame) and BMP,
# without applying EXIF orientation. Bytes sent straight to it (TF Serving) must be one of those;
# hubflow-predict normalises every image first, as preprocessing stored the training images.


def top_k(num_labels: int) -> int:
    """How many classes the top-k outputs hold for a model with ``num_labels`` labels."""
    return min(MAX_TOP_K, num_labels)
