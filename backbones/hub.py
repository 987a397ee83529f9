"""Loading a backbone: ``hub.load`` for embedding, ``hub.KerasLayer`` for training, and the probe.

Every backbone — preset, Hub/Kaggle handle or local SavedModel — is loaded through the same
TF-Hub calls, so a model that works here works the same on Dataflow workers and in training.
Built-in backbones are first resolved to their cache path (:mod:`backbones.cache`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable

import tensorflow as tf

from backbones.cache import UntrustedCacheError, local_handle
from schemas.backbones import BackboneSpec

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
    import tensorflow_hub as hub

    return hub.resolve(local_handle(spec.handle))


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
    if spec.embedding_dim and spec.embedding_dim != dim:
        _LOGGER.warning(
            "%s: expected %d features, model returns %d", spec.name, spec.embedding_dim, dim
        )
    return dataclasses.replace(spec, image_size=int(size), embedding_dim=dim)


def keras_layer(spec: BackboneSpec, trainable: bool = False):
    """The backbone as a ``hub.KerasLayer`` named ``backbone`` (a tf_keras layer, Keras 2 only)."""
    import tensorflow_hub as hub

    return hub.KerasLayer(local_handle(spec.handle), trainable=trainable, name="backbone")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
