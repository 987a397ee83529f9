"""TensorFlow Lite as a CPU runtime for a frozen backbone: conversion, cache, parity, interpreter.

On CPU a frozen backbone runs faster in TensorFlow Lite with its XNNPACK delegate (in the
``tensorflow`` wheel; ``tf.lite.Interpreter`` applies it to float models by default) than in
TensorFlow. This module owns that path:

* **Conversion.** The function both runtimes run, uint8 pixels ``[B, S, S, 3]`` -> features
  ``[B, D]`` (:func:`pixels_model`: the backbone after ``backbones.inputs``' scaling), is traced at
  a fixed batch size (:data:`MODEL_BATCH_SIZE`, 1: the fastest here) and converted to a float32
  TFLite model (``TFLiteConverter.from_concrete_functions``; TFLite builtin ops only). A job's
  batch runs through it in model-sized pieces.
* **Parity.** The converted model and TensorFlow embed seeded probe images; the lowest per-image
  cosine is recorded. A model under :data:`PARITY_MIN_COSINE` is not used. For a model of batch
  size > 1 a partial batch is probed too: it runs at its own size (``resize_tensor_input``: 0.2 ms
  to re-plan, then the cost of its own images) when that gives the same features, otherwise it
  is padded to the full batch (the cost of a full batch).
* **Cache.** Each conversion, and each failed one with its reason, is an entry of the hubflow
  cache (:func:`backbones.cache.build_once`: built once under a lock, sealed with a digest,
  verified on every use). Its name holds a key over the backbone's content digest, the input
  size, the batch size and the TensorFlow version, so a changed backbone (or TensorFlow) gets a
  new conversion. The parity result is in the entry's record: a job that finds the entry
  neither converts nor checks again, and an entry whose record cannot be read is made again.
  A built-in's entries sit beside it in the cache dir; other backbones' in ``<cache>/tflite/``.
* **Choice.** :func:`resolve` turns ``--inference_runtime`` into the runtime a job uses.
* **Interpreter.** :class:`TFLiteEmbedder` runs the model with one thread per core this process
  may use.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import posixpath
import re
import shutil
import tempfile
import threading
import time
import types
import warnings
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf

from backbones import cache, hub
from backbones.inputs import pixels_to_backbone_input
from schemas.backbones import (
    RUNTIME_AUTO,
    RUNTIME_TENSORFLOW,
    RUNTIME_TFLITE,
    BackboneSpec,
    builtin_name,
    is_builtin,
)
from schemas.manifest import PRECISION_FLOAT32

_LOGGER = logging.getLogger(__name__)

PARITY_MIN_COSINE = 0.9999  # lowest accepted cosine, TFLite vs TensorFlow, on the probe batch
FORMAT_VERSION = 1  # bumped when what an entry holds, or how it is made, changes
MODEL_FILE = "model.tflite"
RECORD_FILE = "conversion.json"
SUBDIR = "tflite"  # under the cache dir, for backbones that are not built-ins
PROBE_SEED = 20240601
PROBE_IMAGES = 8  # images in the parity probe
# The converted model's batch size. Measured with EfficientNet-Lite0 on 2 cores: batch 1 runs at
# 7-9 CPU ms per image against 10.4 at batch 32 (TensorFlow: 15-17), and beside a busy Pillow
# thread (the job's image work) at 52-69 img/s against 27-38; the job's larger RunInference
# batches run through it one image at a time. See the README's Performance section.
MODEL_BATCH_SIZE = 1


@dataclasses.dataclass(frozen=True)
class EmbeddingRuntime:
    """The runtime a job embeds with, as its workers receive it (picklable).

    Attributes:
      name: ``tensorflow`` or ``tflite`` (what the manifest records).
      reason: why this runtime, for the log and the dry run.
      model_dir: for TFLite, the cache entry (or a staged copy of it) holding ``model.tflite``.
      model_sha256: the digest workers check ``model.tflite`` against before loading it.
      batch_size: the batch size the model was converted for (any batch runs through it).
      resize_partial: a partial batch runs at its own size (else it is padded).
      min_cosine: the parity measured against TensorFlow on the probe batch.
      precision: ``float32``, or ``bfloat16`` (TensorFlow only: oneDNN auto-mixed precision).
    """

    name: str
    reason: str = ""
    model_dir: str | None = None
    model_sha256: str | None = None
    batch_size: int = 0
    resize_partial: bool = True
    min_cosine: float | None = None
    precision: str = PRECISION_FLOAT32


TENSORFLOW = EmbeddingRuntime(RUNTIME_TENSORFLOW, "the default")


def worker_threads() -> int:
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def pixels_model(embedder: Callable, image_size: int, batch_size: int | None = None):
    """uint8 pixels ``[N, S, S, 3]`` -> float32 features: the function either runtime runs."""
    shape = [batch_size, image_size, image_size, 3]

    @tf.function(input_signature=[tf.TensorSpec(shape, tf.uint8, name="pixels")])
    def embed(pixels: tf.Tensor) -> tf.Tensor:
        return embedder(pixels_to_backbone_input(pixels))

    return embed


class TFLiteEmbedder:
    """A converted backbone in ``tf.lite.Interpreter`` (XNNPACK): uint8 pixels -> features.

    Thread-safe (one call at a time). Batches of the converted size run as they are; a partial
    batch runs resized to its own size, or padded when ``resize_partial`` is False.
    """

    def __init__(
        self,
        content: bytes,
        batch_size: int,
        *,
        resize_partial: bool = True,
        num_threads: int | None = None,
    ):
        with warnings.catch_warnings():  # "tf.lite.Interpreter is deprecated": it is the
            warnings.simplefilter("ignore")  # one that ships in the tensorflow wheel
            self._interpreter = tf.lite.Interpreter(
                model_content=content, num_threads=num_threads or worker_threads()
            )
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch_size = batch_size
        self._resize_partial = resize_partial
        self._rows = batch_size
        self._lock = threading.Lock()
        self._interpreter.allocate_tensors()

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """``[N, S, S, 3]`` uint8 -> ``[N, D]`` float32, for any N >= 1."""
        with self._lock:
            parts = [
                self._run(pixels[i : i + self._batch_size])
                for i in range(0, len(pixels), self._batch_size)
            ]
        return np.concatenate(parts) if len(parts) > 1 else parts[0]

    def _run(self, pixels: np.ndarray) -> np.ndarray:
        n = len(pixels)
        rows = n if self._resize_partial else self._batch_size
        if rows != self._rows:
            self._interpreter.resize_tensor_input(self._input, [rows, *pixels.shape[1:]])
            self._interpreter.allocate_tensors()
            self._rows = rows
        if n < rows:
            pixels = np.concatenate([pixels, np.zeros((rows - n, *pixels.shape[1:]), pixels.dtype)])
        self._interpreter.set_tensor(self._input, np.ascontiguousarray(pixels, np.uint8))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output)[:n].astype(np.float32, copy=False)


def load(runtime: EmbeddingRuntime) -> TFLiteEmbedder:
    """The TFLite model of a resolved runtime, read from its cache entry or staged copy.

    Raises:
      ValueError: the file is not the one the launcher converted and checked.
    """
    path = posixpath.join(runtime.model_dir, MODEL_FILE)
    with tf.io.gfile.GFile(path, "rb") as f:
        content = f.read()
    if hashlib.sha256(content).hexdigest() != runtime.model_sha256:
        raise ValueError(f"{path} differs from the TFLite model the launcher checked")
    return TFLiteEmbedder(content, runtime.batch_size, resize_partial=runtime.resize_partial)


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    """The lowest row-wise cosine of two ``[N, D]`` arrays; -1 if either is not finite."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape or not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return -1.0
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    both_zero = (norms == 0) & np.all(a == b, axis=1)
    cosines = np.where(both_zero, 1.0, np.sum(a * b, axis=1) / np.maximum(norms, 1e-30))
    return float(np.min(cosines))


def entry_location(spec: BackboneSpec, digest: str, batch_size: int) -> tuple[str, str]:
    """``(entry name, cache subdir)`` of a conversion: beside a built-in, else in ``tflite/``."""
    key = json.dumps(
        [FORMAT_VERSION, digest, spec.image_size, batch_size, tf.__version__], separators=(",", ":")
    )
    suffix = f"b{batch_size}-{hashlib.sha256(key.encode()).hexdigest()[:24]}"
    if is_builtin(spec.handle):
        return f"{builtin_name(spec.handle)}-{cache.CACHE_VERSION}.tflite-{suffix}", ""
    return suffix, SUBDIR


def converted(spec: BackboneSpec, batch_size: int, digest: str | None = None) -> tuple[str, dict]:
    """The cache entry of the backbone's conversion at ``batch_size``, made on first use.

    The parity check runs when the entry is made; its result is part of the record, so a job
    that finds the entry neither converts nor checks again. ``digest`` is the backbone's
    :func:`~backbones.hub.content_digest` when the caller has it (computed here otherwise).

    Returns:
      The entry's path and its record: ``converted`` (bool), then ``error`` or ``min_cosine``,
      ``resize_partial``, ``model_sha256``; and ``convert_seconds``, versions, the key's parts.
    """
    digest = digest or hub.content_digest(hub.model_dir(spec))
    name, subdir = entry_location(spec, digest, batch_size)
    what = f"TFLite conversion of {spec.name} (batch {batch_size})"
    path = cache.build_once(
        name,
        lambda target: _build(spec, batch_size, digest, target),
        what,
        subdir,
        lambda entry: _record_problem(entry, digest),
    )
    with open(os.path.join(path, RECORD_FILE), encoding="utf-8") as f:
        return path, json.load(f)


def _record_problem(entry: str, digest: str) -> str | None:
    """Why a verified conversion entry cannot be used (None if it can)."""
    try:
        with open(os.path.join(entry, RECORD_FILE), encoding="utf-8") as f:
            record = json.load(f)
        ok = record["backbone_sha256"] == digest and isinstance(record["converted"], bool)
        if ok and record["converted"]:
            cosine = record["min_cosine"]
            ok = isinstance(cosine, (int, float)) and not isinstance(cosine, bool)
            ok = ok and isinstance(record["resize_partial"], bool)
            ok = ok and os.path.isfile(os.path.join(entry, MODEL_FILE))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"unreadable conversion record ({type(e).__name__})"
    return None if ok else "the conversion record is incomplete or of other files"


def resolve(
    spec: BackboneSpec,
    requested: str,
    *,
    gpu: bool = False,
    batch_size: int = MODEL_BATCH_SIZE,
    digest: str | None = None,
) -> EmbeddingRuntime:
    """The runtime a job embeds with, for ``--inference_runtime`` ``requested``.

    ``tensorflow`` is TensorFlow. ``auto`` is TensorFlow on a GPU, else TFLite when the backbone
    converts and passes the parity check (one warning line and TensorFlow when it does not).
    ``tflite`` is TFLite or an error. ``batch_size`` is the TFLite model's; it runs any batch.
    ``digest``: the backbone's content digest, when the caller has it (see :func:`converted`).

    Raises:
      ValueError: one line naming ``--inference_runtime``, for ``tflite`` on a backbone that
        does not convert or fails the parity check.
      UntrustedCacheError: the cache cannot be trusted (see :mod:`backbones.cache`).
    """
    if requested == RUNTIME_TENSORFLOW:
        return dataclasses.replace(TENSORFLOW, reason="--inference_runtime tensorflow")
    if requested == RUNTIME_AUTO and gpu:
        return dataclasses.replace(TENSORFLOW, reason="auto: the workers have a GPU")
    path, record = converted(spec, batch_size, digest)
    if not record["converted"]:
        problem = f"does not convert to TFLite ({record['error']})"
    elif record["min_cosine"] < PARITY_MIN_COSINE:
        problem = (
            f"converts to TFLite with embeddings unlike TensorFlow's (min cosine "
            f"{record['min_cosine']:.6f} < {PARITY_MIN_COSINE} on a probe batch)"
        )
    else:
        problem = None
    if problem and requested == RUNTIME_TFLITE:
        raise ValueError(
            f"--inference_runtime tflite: {spec.name} {problem}; "
            "use --inference_runtime tensorflow or auto"
        )
    if problem:
        _LOGGER.warning(
            "--inference_runtime auto: %s %s; embedding with TensorFlow", spec.name, problem
        )
        return dataclasses.replace(TENSORFLOW, reason=f"auto: {spec.name} {problem}")
    hub.release(spec)  # the job's workers will not load the SavedModel in this process
    reason = (
        f"min cosine {record['min_cosine']:.7f} against TensorFlow on {PROBE_IMAGES} probe "
        f"images; model {os.path.join(path, MODEL_FILE)}"
    )
    _LOGGER.info("embedding with TFLite (XNNPACK, %d threads): %s", worker_threads(), reason)
    return EmbeddingRuntime(
        RUNTIME_TFLITE,
        reason,
        path,
        record["model_sha256"],
        batch_size,
        record["resize_partial"],
        record["min_cosine"],
    )


# ---------------------------------------------------------------------------------------------
# Building an entry


def _build(spec: BackboneSpec, batch_size: int, digest: str, path: str) -> None:
    """Converts and checks the backbone into a temp dir, then renames it to ``path``."""
    parent, base = os.path.split(path)
    tmp = tempfile.mkdtemp(prefix=f".{base}.tmp-", dir=parent)
    try:
        record = {
            "format_version": FORMAT_VERSION,
            "backbone": spec.to_json(),
            "backbone_sha256": digest,
            "batch_size": batch_size,
            "tensorflow": tf.__version__,
        }
        embedder = hub.load(spec)
        embed = pixels_model(embedder, spec.image_size, batch_size)
        reference = pixels_model(embedder, spec.image_size)
        # The loaded module holds the variables; a signature's closure is not trackable.
        trackable = None if isinstance(embedder, types.FunctionType) else embedder
        started = time.perf_counter()
        try:
            with _stderr_to(os.path.join(tmp, "converter.log")):
                content = _convert(embed, trackable)
            record.update(_check(content, reference, spec.image_size, batch_size))
        except Exception as e:  # noqa: BLE001 - any converter/interpreter failure: not usable
            record.update(converted=False, error=conversion_error(e))
        else:
            with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
                f.write(content)
            record.update(converted=True, model_sha256=hashlib.sha256(content).hexdigest())
        record["convert_seconds"] = round(time.perf_counter() - started, 2)
        with open(os.path.join(tmp, RECORD_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not is_builtin(spec.handle):
        cache.prune_orphans(parent, RECORD_FILE)
    _LOGGER.info(
        "TFLite conversion of %s (batch %d) in %.1f s: %s",
        spec.name,
        batch_size,
        record["convert_seconds"],
        f"min cosine {record['min_cosine']:.7f}" if record["converted"] else record["error"],
    )


def _convert(embed, trackable) -> bytes:
    function = embed.get_concrete_function()
    converter = tf.lite.TFLiteConverter.from_concrete_functions([function], trackable)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    return converter.convert()


def _check(content: bytes, reference, image_size: int, batch_size: int) -> dict:
    """Parity against TensorFlow on seeded probe images, and how a partial batch runs."""
    rng = np.random.default_rng(PROBE_SEED)
    count = max(PROBE_IMAGES, batch_size)
    pixels = rng.integers(0, 256, [count, image_size, image_size, 3], dtype=np.uint8)
    expected = reference(tf.constant(pixels)).numpy()
    model = TFLiteEmbedder(content, batch_size, resize_partial=True)
    cosine = min_cosine(model(pixels), expected)
    resize = False
    if batch_size > 1:
        try:  # one image at its own size, then the full batch again
            after = min(
                min_cosine(model(pixels[:1]), expected[:1]), min_cosine(model(pixels), expected)
            )
            resize = after >= PARITY_MIN_COSINE
        except Exception:  # noqa: BLE001 - a model fixed to its batch size: pad instead
            resize = False
        if not resize:
            padded = TFLiteEmbedder(content, batch_size, resize_partial=False)
            cosine = min(cosine, min_cosine(padded(pixels[:1]), expected[:1]))
    return {"min_cosine": cosine, "resize_partial": resize}


_OPS = re.compile(r"(?:Custom ops|TF Select ops|Flex ops): (.+)")


def conversion_error(error: BaseException) -> str:
    """One line saying why a conversion failed: the ops TFLite lacks, or the error's first line."""
    text = str(error)
    ops = sorted({op.strip() for found in _OPS.findall(text) for op in found.split(",")})
    if ops:
        return f"ops TFLite lacks: {', '.join(ops)}"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0][:200]}" if lines else type(error).__name__


@contextlib.contextmanager
def _stderr_to(path: str) -> Iterator[None]:
    """Sends file descriptor 2 to ``path`` meanwhile: the converter's C++ diagnostics (dozens of
    lines; the reason is in the exception) go to the entry's ``converter.log``, not the console."""
    with open(path, "wb") as log:
        saved = os.dup(2)
        os.dup2(log.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
