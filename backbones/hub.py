"""Loading a backbone: ``hub.load`` for embedding, ``hub.KerasLayer`` for training, and the probe.

Every backbone — preset, Hub/Kaggle handle or local SavedModel — is loaded through the same
TF-Hub calls, so a model that works here works the same on Dataflow workers and in training.
Built-in backbones are first resolved to their cache path (:mod:`backbones.cache`).

The probe (:func:`probe`) loads the SavedModel and calls it once to learn its input and feature
sizes: 3-4 CPU seconds for EfficientNet-Lite0, a quarter of the preprocessing job's start-up,
spent again on every run although the files have not changed, and wasted when the job then
embeds with TFLite. :func:`describe` records the probe's result in the hubflow cache under the
SavedModel's content digest (:func:`content_digest`), so a later job with the same files reads
the sizes instead (a few ms) and loads the model only where it embeds with it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import shutil
import tempfile
import threading
from collections.abc import Callable

import tensorflow as tf

from backbones import cache
from backbones.cache import UntrustedCacheError, local_handle
from schemas.backbones import BackboneSpec, builtin_name, is_builtin

_LOGGER = logging.getLogger(__name__)

Embedder = Callable[[tf.Tensor], tf.Tensor]


# Modules loaded by `probe`, handed to the next `load` of the same handle in this process. On
# the DirectRunner's in-process mode the job's RunInference runs in the launcher's process and
# takes the launcher's module instead of loading the SavedModel a second time (seconds of
# start-up); a Dataflow worker finds nothing here and loads its own.
# Keyed by handle, with the local path the module came from: a built-in's handle names another
# cache entry when HUBFLOW_CACHE changes, and then the kept module is not the one to load.
_PROBED: dict[str, tuple[str, object]] = {}
_PROBED_LOCK = threading.Lock()

PROBE_FORMAT_VERSION = 1  # bumped when what a probe record holds, or how it is made, changes
PROBE_RECORD_FILE = "probe.json"
PROBE_SUBDIR = "probed"  # under the cache dir
_CHUNK = 1 << 20


def _load_module(handle: str) -> tuple[str, object]:
    """The local path of ``handle`` (a built-in's cache entry) and the module loaded from it."""
    import tensorflow_hub as hub

    path = local_handle(handle)
    return path, hub.load(path)


def _callable(module) -> Embedder:
    if callable(module):
        return module
    signature = module.signatures.get(
        tf.saved_model.DEFAULT_SERVING_SIGNATURE_DEF_KEY
    ) or module.signatures.get("default")
    if signature is None:
        raise ValueError("the SavedModel is neither callable nor has a serving_default signature")

    def call(images: tf.Tensor) -> tf.Tensor:
        outputs = signature(images)
        return next(iter(outputs.values()))

    return call


def signature_image_size(module) -> int | None:
    """The fixed square input size declared by a loaded module's call signature, if any."""
    candidates = []
    call = getattr(module, "__call__", None)  # noqa: B004 - a tf.function, not callable()
    for fn in getattr(call, "concrete_functions", []) or []:
        candidates.append(fn.structured_input_signature)
    for fn in getattr(module, "signatures", {}).values():
        candidates.append(fn.structured_input_signature)
    for args, kwargs in candidates:
        for spec in tf.nest.flatten((args, kwargs)):
            if isinstance(spec, tf.TensorSpec) and spec.shape.rank == 4:
                height, width = spec.shape[1], spec.shape[2]
                if height is not None and height == width:
                    return int(height)
    return None


def load(spec: BackboneSpec) -> Embedder:
    """Loads the backbone: a function from ``[N, S, S, 3]`` float32 in [0, 1] to ``[N, D]``."""
    with _PROBED_LOCK:
        probed = _PROBED.pop(spec.handle, None)
    path = local_handle(spec.handle)
    if probed is not None and probed[0] == path:
        return _callable(probed[1])
    import tensorflow_hub as hub

    return _callable(hub.load(path))


def release(spec: BackboneSpec) -> None:
    """Drops the module :func:`probe` kept for the next :func:`load` when none will come (the
    job embeds with another runtime), so the launcher does not hold it for the whole run."""
    with _PROBED_LOCK:
        _PROBED.pop(spec.handle, None)


def model_dir(spec: BackboneSpec) -> str:
    """The SavedModel directory :func:`load` reads: the cache entry of a built-in, TF-Hub's
    download of a handle URL, or the path itself."""
    path = local_handle(spec.handle)
    if os.path.isdir(path):  # what hub.resolve returns for a local folder, without importing it
        return path
    import tensorflow_hub as hub

    return hub.resolve(path)


def content_digest(path: str) -> str:
    """sha256 over a SavedModel folder's relative file paths and contents (local or gs://).

    What the manifest records as ``backbone_sha256`` and what keys the cache's derived entries
    (probe records, TFLite conversions): ~40 ms for EfficientNet-Lite0's 16 MB.
    """
    files = sorted(
        posixpath.relpath(posixpath.join(root, name), path)
        for root, _, names in tf.io.gfile.walk(path)
        for name in names
    )
    digest = hashlib.sha256()
    for rel in files:
        digest.update(rel.encode() + b"\0")
        with tf.io.gfile.GFile(posixpath.join(path, rel), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def describe(spec: BackboneSpec) -> tuple[BackboneSpec, str]:
    """The backbone with its input and feature sizes filled in, and its content digest.

    The sizes come from the record of an earlier probe of the same files (same content digest,
    same ``--image_size``, same TensorFlow version), else from :func:`probe`, whose result is then
    recorded (:func:`backbones.cache.build_once`: under a lock, sealed with a digest, verified on
    each use; a corrupted or unreadable record is deleted and the backbone probed again). Only a
    successful probe is recorded, so a backbone that failed is tried again next time; without a
    writable cache the backbone is probed, with a warning.

    Raises:
      ValueError: as :func:`probe` (and for a handle whose files cannot be read).
      UntrustedCacheError: the cache cannot be trusted (see :mod:`backbones.cache`).
    """
    if spec.parts:  # a composite's parts are described first: it is built from them
        spec = dataclasses.replace(spec, parts=tuple(describe(part)[0] for part in spec.parts))
    try:
        digest = content_digest(model_dir(spec))
    except UntrustedCacheError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a user error to report
        raise ValueError(f"--backbone: cannot load {spec.handle!r}: {_first_line(e)}") from e
    key = json.dumps(
        [PROBE_FORMAT_VERSION, digest, spec.image_size or 0, tf.__version__],
        separators=(",", ":"),
    )
    prefix = builtin_name(spec.handle) if is_builtin(spec.handle) else "model"
    name = f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    probed: list[BackboneSpec] = []

    def build(path: str) -> None:
        probed.append(probe(spec))
        _write_probe_record(path, probed[0], digest, spec.image_size or 0)

    def check(path: str) -> str | None:
        return _probe_record_problem(path, digest, spec.image_size or 0)

    what = f"probe record of {spec.name}"
    try:
        path = cache.build_once(name, build, what, PROBE_SUBDIR, check)
    except OSError as e:  # no writable cache (a read-only home): the sizes, unrecorded
        _LOGGER.warning("cannot record the probe of %s in the cache: %s", spec.name, e)
        return (probed[0] if probed else probe(spec)), digest
    if probed:
        return probed[0], digest
    with open(os.path.join(path, PROBE_RECORD_FILE), encoding="utf-8") as f:
        recorded = json.load(f)["backbone"]
    _LOGGER.debug("%s: sizes from the probe record %s", spec.name, path)
    found = dataclasses.replace(
        spec, image_size=recorded["image_size"], embedding_dim=recorded["embedding_dim"]
    )
    _check_dim(spec, found.embedding_dim)
    return found, digest


def _write_probe_record(path: str, probed: BackboneSpec, digest: str, requested: int) -> None:
    parent, base = os.path.split(path)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, PROBE_RECORD_FILE), "w", encoding="utf-8") as f:
            json.dump(
                {
                    "format_version": PROBE_FORMAT_VERSION,
                    "backbone": probed.to_json(),
                    "backbone_sha256": digest,
                    "requested_image_size": requested,
                    "tensorflow": tf.__version__,
                },
                f,
                indent=2,
            )
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_builtin(probed.handle):
        cache.prune_orphans(parent, PROBE_RECORD_FILE)


def _probe_record_problem(path: str, digest: str, requested: int) -> str | None:
    """Why a verified probe record cannot be used (None if it can)."""
    try:
        with open(os.path.join(path, PROBE_RECORD_FILE), encoding="utf-8") as f:
            record = json.load(f)
        sizes = record["backbone"]["image_size"], record["backbone"]["embedding_dim"]
        same = (
            record["format_version"] == PROBE_FORMAT_VERSION
            and record["backbone_sha256"] == digest
            and record["requested_image_size"] == requested
        )
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable probe record ({type(e).__name__}: {_first_line(e)})"
    if not same:
        return "the probe record is of other files or another format"
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in sizes):
        return f"the probe record holds no valid sizes ({sizes})"
    return None


def probe(spec: BackboneSpec) -> BackboneSpec:
    """Loads the backbone once and fills in its input size and embedding size.

    Raises:
      ValueError: naming ``--backbone`` when the model cannot be loaded or called, or
        ``--image_size`` when neither the model nor the flag fixes the input size.
    """
    try:
        path, module = _load_module(spec.handle)
    except UntrustedCacheError:
        raise  # already one line naming --backbone, the path and what to do
    except Exception as e:  # noqa: BLE001 - any loader failure is a user error to report
        raise ValueError(f"--backbone: cannot load {spec.handle!r}: {_first_line(e)}") from e
    size = spec.image_size or signature_image_size(module)
    if not size:
        raise ValueError(
            f"--image_size: {spec.handle!r} does not fix its input size; pass --image_size"
        )
    try:
        features = _callable(module)(tf.zeros([1, size, size, 3], tf.float32))
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"--backbone: {spec.handle!r} failed on a {size}x{size} image: {_first_line(e)}"
        ) from e
    if features.shape.rank != 2:
        raise ValueError(
            f"--backbone: {spec.handle!r} returns shape {features.shape}; "
            "expected a feature-vector model returning [batch, features]"
        )
    dim = int(features.shape[-1])
    with _PROBED_LOCK:
        _PROBED[spec.handle] = (path, module)
    _check_dim(spec, dim)
    return dataclasses.replace(spec, image_size=int(size), embedding_dim=dim)


def _check_dim(spec: BackboneSpec, dim: int) -> None:
    if spec.embedding_dim and spec.embedding_dim != dim:
        _LOGGER.warning(
            "%s: expected %d features, model returns %d", spec.name, spec.embedding_dim, dim
        )


def keras_layer(spec: BackboneSpec, trainable: bool = False, name: str = "backbone"):
    """The backbone as a ``hub.KerasLayer`` named ``name`` (a tf_keras layer, Keras 2 only)."""
    import tensorflow_hub as hub

    return hub.KerasLayer(local_handle(spec.handle), trainable=trainable, name=name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
