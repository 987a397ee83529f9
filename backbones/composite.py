"""Composite backbones (``--backbone a,b``): several backbones run as one, features concatenated.

A composite is a SavedModel like any other backbone: ``[N, S, S, 3]`` float32 in [0, 1] to
``[N, D1 + D2 + ...]``, where ``S`` is the largest part's input size and each part sees the
input resized to its own size (:func:`part_input`). Built as one model, everything downstream
takes it unchanged: the probe and its record, the content digest the manifest records, the
TFLite conversion, ``--reuse_from``, staging for Dataflow workers, ``hub.KerasLayer`` in
training, and the export, which so stitches every part into the served model.

Each machine builds it from the parts into its own cache (``<cache>/composite/concat-<key>``,
:func:`backbones.cache.build_once`), keyed by the parts' content digests and sizes, so a changed
part makes a new composite and the old one is never loaded for it.

Why a new model rather than running the parts side by side in the job: one model is one
RunInference call, one TFLite conversion and one parity check, and the trainer, the export and
batch prediction need to know nothing about it. Fine-tuning is the exception: it unfreezes the
top layers of each part, which it can only tell apart in the parts themselves
(:func:`stitch` is shared so both give the same features).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence

import tensorflow as tf

from backbones import cache, hub, registry
from schemas.backbones import concat_parts

FORMAT_VERSION = 1  # bumped when what a composite holds, or how it is built, changes
RECORD_FILE = "composite.json"
SUBDIR = "composite"  # under the cache dir


def part_input(images: tf.Tensor, part_size: int) -> tf.Tensor:
    """The composite's input as one part sees it: resized (bilinear) to the part's input size.

    Not antialiased: the parts' sizes are within 2x of each other (224-260 for the
    EfficientNet-Lite presets), where antialiasing changes little, and plain bilinear resizing
    is a TFLite builtin, so the composite converts to TFLite whole.
    """
    if images.shape[1] == part_size and images.shape[2] == part_size:
        return images
    return tf.image.resize(images, [part_size, part_size], method="bilinear")


def stitch(images, parts: Sequence[tuple[Callable, int]]):
    """The composite's features: each ``(layer, size)`` on :func:`part_input`, concatenated."""
    import tf_keras

    features = [layer(part_input(images, size)) for layer, size in parts]
    return tf_keras.layers.Concatenate(name="features")(features)


def save(
    path: str,
    parts: Sequence[tuple[str, int]],
    image_size: int,
    files: dict[str, str] | None = None,
) -> str:
    """Writes the composite of the part SavedModels ``(directory, input size)`` to ``path``.

    It loads with ``hub.load`` (its signature fixes the input size) and with
    ``hub.KerasLayer(path, trainable=True)``: the parts' trainable and batch-norm variables come
    through. Written with ``files`` (name -> text) to a temp dir beside ``path`` and renamed into
    place (:func:`backbones.cache.save_into_place`).
    """
    import tensorflow_hub as hub_lib
    import tf_keras

    inputs = tf_keras.Input([image_size, image_size, 3], name="image")
    layers = [
        (hub_lib.KerasLayer(directory, trainable=True, name=f"part_{i}"), size)
        for i, (directory, size) in enumerate(parts)
    ]
    model = tf_keras.Model(inputs, stitch(inputs, layers), name="composite")
    return cache.save_into_place(model, path, files)


def local_path(handle: str) -> str:
    """The composite's SavedModel in this machine's cache, built on first use, verified on each.

    Raises:
      ValueError: naming ``--backbone`` when a part cannot be loaded or does not fix its size.
      UntrustedCacheError: as :func:`backbones.cache.build_once`.
    """
    parts = []
    for part in (registry.for_handle(h) for h in concat_parts(handle)):
        described, digest = hub.describe(part)
        parts.append((described, digest))
    size = max(part.image_size for part, _ in parts)
    recorded = {
        "format_version": FORMAT_VERSION,
        "backbone": {"handle": handle},
        "image_size": size,
        "parts": [
            {
                "handle": part.handle,
                "sha256": digest,
                "image_size": part.image_size,
                "embedding_dim": part.embedding_dim,
            }
            for part, digest in parts
        ],
        "tensorflow": tf.__version__,
    }
    key = json.dumps(recorded, sort_keys=True, separators=(",", ":"))
    name = f"concat-{hashlib.sha256(key.encode()).hexdigest()[:24]}"

    def build(path: str) -> None:
        part_dirs = [(hub.model_dir(part), part.image_size) for part, _ in parts]
        save(path, part_dirs, size, {RECORD_FILE: json.dumps(recorded, indent=2)})
        cache.prune_orphans(os.path.dirname(path), RECORD_FILE)

    def check(path: str) -> str | None:
        try:
            with open(os.path.join(path, RECORD_FILE), encoding="utf-8") as f:
                same = json.load(f) == recorded
        except (OSError, ValueError) as e:
            return f"unreadable {RECORD_FILE} ({type(e).__name__})"
        return None if same else f"{RECORD_FILE} names other parts"

    what = f"composite backbone of {', '.join(part.name for part, _ in parts)}"
    return cache.build_once(name, build, what, SUBDIR, check)
