"""A RunInference model handler that embeds prepared images with a frozen backbone.

The handler takes images already resized to the backbone's input size, uint8 ``[S, S, 3]``
arrays made by :func:`pipeline.images.backbone_pixels` (within about 1/255 of what the exported
serving model computes from the same image), stacks a batch, scales it with
:func:`backbones.inputs.pixels_to_backbone_input` and runs the model: nothing but the model
runs while the batch waits, so the per-image decoding in ``EncodeFn`` can overlap it.
RunInference loads the model once per worker process (``shared.Shared``) and batches with
``BatchElements``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import tensorflow as tf
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from backbones import hub
from backbones.inputs import pixels_to_backbone_input
from schemas.backbones import BackboneSpec


class _Embedder:
    """The loaded backbone behind one compiled ``images -> embeddings`` function."""

    def __init__(self, spec: BackboneSpec):
        model = hub.load(spec)
        size = spec.image_size

        @tf.function(input_signature=[tf.TensorSpec([None, size, size, 3], tf.uint8)])
        def embed(pixels: tf.Tensor) -> tf.Tensor:
            return model(pixels_to_backbone_input(pixels))

        self._model = model  # keeps the module's variables alive
        self.embed = embed


class ImageEmbeddingModelHandler(ModelHandler[np.ndarray, PredictionResult, _Embedder]):
    """Embeds uint8 ``[S, S, 3]`` images; one :class:`PredictionResult` (float32 ``[D]``) per image.

    The result's ``example`` is None: the input pixels are not kept past the model call.
    """

    def __init__(self, spec: BackboneSpec, max_batch_size: int = 32):
        super().__init__()
        self._spec = spec
        self._max_batch_size = max_batch_size

    def load_model(self) -> _Embedder:
        return _Embedder(self._spec)

    def run_inference(
        self,
        batch: Sequence[np.ndarray],
        model: _Embedder,
        inference_args: dict[str, Any] | None = None,
    ) -> Iterable[PredictionResult]:
        embeddings = model.embed(tf.constant(np.stack(batch))).numpy()
        embeddings = embeddings.astype(np.float32, copy=False)
        return [PredictionResult(None, e) for e in embeddings]

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return "hubflow_embed"

    def batch_elements_kwargs(self) -> dict[str, Any]:
        # Fixed-size batches: the adaptive estimator settles on tiny batches when per-image
        # CPU work (decode, re-encode) competes with the model, and the model is fastest batched.
        return {"min_batch_size": self._max_batch_size, "max_batch_size": self._max_batch_size}
