"""Resolving ``--backbone`` to a :class:`~schemas.backbones.BackboneSpec` and loading it.

Every backbone — preset, Hub/Kaggle handle or local SavedModel — is loaded through the same
``hub.load`` call, so a model that works here works the same on Dataflow workers and in training.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable

import tensorflow as tf

from schemas import backbones
from schemas.backbones import BackboneSpec

_LOGGER = logging.getLogger(__name__)

Embedder = Callable[[tf.Tensor], tf.Tensor]


def resolve(value: str, image_size: int | None = None) -> BackboneSpec:
    """Maps a ``--backbone`` value to a spec; the input size may still be unknown (0).

    Args:
      value: a preset name, a Hub/Kaggle handle URL, or a SavedModel path (local or gs://).
      image_size: ``--image_size``; overrides the preset's size and is used for handles whose
        signature does not fix one.

    Raises:
      ValueError: for an unknown preset name.
    """
    if value in backbones.PRESETS:
        spec = backbones.PRESETS[value]
        return dataclasses.replace(spec, image_size=image_size) if image_size else spec
    if not backbones.is_handle(value):
        known = ", ".join(sorted(backbones.PRESETS))
        raise ValueError(
            f"--backbone: unknown preset {value!r}; use one of {known}, "
            "a TF-Hub handle URL or a SavedModel directory"
        )
    handle = value if "://" in value else os.path.abspath(value)
    return BackboneSpec(name=value, handle=handle, image_size=image_size or 0)


def cache_dir() -> str:
    """Where built-in backbones are built: ``$HUBFLOW_CACHE``, default ``~/.cache/hubflow``."""
    return os.environ.get("HUBFLOW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hubflow"
    )


def _build_builtin(name: str, path: str) -> None:
    if name == "efficientnet_lite0":
        from pipeline import efficientnet_lite

        efficientnet_lite.save_hub_module(path)
    else:
        raise ValueError(f"--backbone: unknown built-in backbone {name!r}")


def local_handle(handle: str) -> str:
    """The handle ``hub.load`` / ``hub.KerasLayer`` should use: built-ins become cache paths.

    A built-in is built on first use into :func:`cache_dir`. The builder writes to a temp dir
    and renames it into place, so a concurrent process (or Dataflow worker) never sees a
    half-written entry; when two build at once, the first rename wins and both use it.
    """
    if not backbones.is_builtin(handle):
        return handle
    name = handle[len(backbones.BUILTIN_SCHEME) :]
    path = os.path.join(cache_dir(), f"{name}-v1")
    if not os.path.isdir(path):
        _LOGGER.info("building the %s backbone into %s (first use only)", name, path)
        try:
            _build_builtin(name, path)
        except (OSError, ValueError):
            if not os.path.isdir(path):  # not a lost race with another builder
                raise
    return path


# Modules loaded by `probe`, handed to the next `load` of the same handle in this process. On
# the DirectRunner's in-process mode the job's RunInference runs in the launcher's process and
# takes the launcher's module instead of loading the SavedModel a second time (seconds of
# start-up); a Dataflow worker finds nothing here and loads its own.
_PROBED: dict[str, object] = {}
_PROBED_LOCK = threading.Lock()


def _load_module(handle: str):
    import tensorflow_hub as hub

    return hub.load(local_handle(handle))


def _callable(module) -> Embedder:
    if callable(module):
        return module
    signature = module.signatures.get("serving_default") or module.signatures.get("default")
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
        module = _PROBED.pop(spec.handle, None)
    return _callable(module if module is not None else _load_module(spec.handle))


def probe(spec: BackboneSpec) -> BackboneSpec:
    """Loads the backbone once and fills in its input size and embedding size.

    Raises:
      ValueError: naming ``--backbone`` when the model cannot be loaded or called, or
        ``--image_size`` when neither the model nor the flag fixes the input size.
    """
    try:
        module = _load_module(spec.handle)
    except Exception as e:  # noqa: BLE001 - any loader failure is a user error to report
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--backbone: cannot load {spec.handle!r}: {reason}") from e
    size = spec.image_size or signature_image_size(module)
    if not size:
        raise ValueError(
            f"--image_size: {spec.handle!r} does not fix its input size; pass --image_size"
        )
    try:
        features = _callable(module)(tf.zeros([1, size, size, 3], tf.float32))
    except Exception as e:  # noqa: BLE001
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"--backbone: {spec.handle!r} failed on a {size}x{size} image: {reason}"
        ) from e
    if features.shape.rank != 2:
        raise ValueError(
            f"--backbone: {spec.handle!r} returns shape {features.shape}; "
            "expected a feature-vector model returning [batch, features]"
        )
    dim = int(features.shape[-1])
    with _PROBED_LOCK:
        _PROBED[spec.handle] = module
    if spec.embedding_dim and spec.embedding_dim != dim:
        _LOGGER.warning(
            "%s: expected %d features, model returns %d", spec.name, spec.embedding_dim, dim
        )
    return dataclasses.replace(spec, image_size=int(size), embedding_dim=dim)
