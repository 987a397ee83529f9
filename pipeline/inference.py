"""A RunInference model handler that embeds encoded images with a frozen backbone.

The handler takes the stored JPEG bytes, so decoding and resizing run in the same TensorFlow
ops (:func:`schemas.backbones.decode_to_backbone_input`) that the exported serving model uses:
the stored embedding is the backbone applied to the stored image. RunInference loads the model
once per worker process (``shared.Shared``) and batches with ``BatchElements``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from pipeline import backbone
from schemas.backbones import BackboneSpec, decode_to_backbone_input


class _Embedder:
    """The loaded backbone behind one compiled ``bytes -> embeddings`` function."""

    def __init__(self, spec: BackboneSpec):
        model = backbone.load(spec)
        size = spec.image_size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string)])
        def embed(encoded: tf.Tensor) -> tf.Tensor:
            return model(decode_to_backbone_input(encoded, size))

        self._model = model  # keeps the module's variables alive
        self.embed = embed


class ImageEmbeddingModelHandler(ModelHandler[bytes, PredictionResult, _Embedder]):
    """Embeds encoded image bytes; one :class:`PredictionResult` (float32 ``[D]``) per image."""

    def __init__(self, spec: BackboneSpec, max_batch_size: int = 32):
        super().__init__()
        self._spec = spec
        self._max_batch_size = max_batch_size

    def load_model(self) -> _Embedder:
        return _Embedder(self._spec)

    def run_inference(
        self,
        batch: Sequence[bytes],
        model: _Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embeddings = model.embed(tf.constant(list(batch), dtype=tf.string)).numpy()
        embeddings = embeddings.astype(np.float32, copy=False)
        return [PredictionResult(x, e) for x, e in zip(batch, embeddings, strict=True)]

    def get_num_bytes(self, batch: Sequence[bytes]) -> int:
        return sum(len(x) for x in batch)

    def get_metrics_namespace(self) -> str:
        return "hubflow_embed"

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed-size batches: the adaptive estimator settles on tiny batches when per-image
        # CPU work (decode, re-encode) competes with the model, and the model is fastest batched.
        return {"min_batch_size": self._max_batch_size, "max_batch_size": self._max_batch_size}
