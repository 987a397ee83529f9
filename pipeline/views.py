"""Augmented views of train images (``--train_views K``): augmentation for stored embeddings.

A head trained on stored embeddings never sees an augmented image. With ``--train_views K`` the
job also embeds K augmented views of every train image and stores their embeddings in the same
record (``schemas.features.EMBEDDING_VIEWS``, ``[K, D]``): a record is still one image, so the
row accounting, the splits and deduplication do not change. The trainer's head then draws one of
the centre and the K views per example and epoch (``training.data``).

* Only train records get views. Eval and test must score the image as serving sees it (the
  centre view), and the unlabeled split is not trained on; their records carry no views at all
  rather than K copies of the centre, which would only cost space and could be mistaken for views.
* A view is a random resized crop of the stored image (upright, downscaled as stored) and/or a
  horizontal flip (``schemas.manifest.VIEW_CROP_AREA`` and ``VIEW_CROP_RATIO``, switches
  ``--view_crop`` and ``--view_flip``), resized straight to the backbone's input size by Pillow
  from the one decode the job makes anyway: a crop box costs one resize.
* View i of an image is drawn from ``(sha256, --view_seed, i)`` alone (NumPy's ``SeedSequence``),
  never from worker order or batch position: a rerun, a rerun on more workers and an incremental
  run give the same views, and the K views are the first K of any larger count.
* The views run through the same RunInference batches as the centre images
  (:class:`ViewsModelHandler`): an element is ``[1 + K, S, S, 3]``, and a batch holds about
  ``--batch_size`` images in all.
* tf.Transform's statistics (the head's z-score) are the centre embeddings', as without views:
  adding views does not change the normalisation.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from PIL import Image

from pipeline import images
from schemas.backbones import CROP_SQUASH
from schemas.manifest import VIEW_CROP_AREA, VIEW_CROP_RATIO, TrainViews

FLAG = "--train_views"
# Off by default (benchmarks/views.py, Lite0, tuned head): K = 2-8 cost 1.3-3.1x the job's CPU
# on hymenoptera and cats-vs-dogs-2k and changed test accuracy by -0.7 to +0.4 points with all
# labels or 10 per class; only hymenoptera with 3 labels per class gained (about +1 point).
DEFAULT_TRAIN_VIEWS = 0
_FLIP_SALT = 1  # the flip's draw has its own stream: switching crop off keeps the flips


def view_count(value: str) -> int:
    """The argparse type of :data:`FLAG`: an integer >= 0 (0: no views)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{FLAG} must be an integer, got {value!r}") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{FLAG} must be 0 (no views) or more, got {number}")
    return number


def _rng(sha256: str, seed: int, index: int, salt: int = 0) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(sha256, 16), seed, index, salt]))


def view_box(
    width: int, height: int, sha256: str, views: TrainViews, index: int
) -> tuple[tuple[float, float, float, float], bool]:
    """The crop box ``(left, upper, right, lower)`` and flip of view ``index`` of an image.

    A random resized crop as in Inception/timm: the area fraction is uniform in
    ``VIEW_CROP_AREA``, the aspect-ratio change log-uniform in ``VIEW_CROP_RATIO``, relative to
    the image's own aspect ratio (a ratio of 1 keeps the image's proportions, squashed into the
    square as ``--crop_fraction 0`` frames the centre view; the recipe does not depend on
    ``--crop_fraction``); a box that does not fit is clipped to the image.
    """
    box = (0.0, 0.0, float(width), float(height))
    if views.crop:
        rng = _rng(sha256, views.seed, index)
        area = rng.uniform(*VIEW_CROP_AREA)
        ratio = math.exp(rng.uniform(math.log(VIEW_CROP_RATIO[0]), math.log(VIEW_CROP_RATIO[1])))
        w = min(1.0, math.sqrt(area * ratio)) * width
        h = min(1.0, math.sqrt(area / ratio)) * height
        left = rng.uniform(0.0, width - w)
        top = rng.uniform(0.0, height - h)
        box = (left, top, left + w, top + h)
    flip = bool(views.flip and _rng(sha256, views.seed, index, _FLIP_SALT).random() < 0.5)
    return box, flip


def view_pixels(image: Image.Image, size: int, sha256: str, views: TrainViews) -> np.ndarray:
    """The ``views.count`` views of an RGB image for the backbone: uint8 ``[K, size, size, 3]``.

    Resized with the filter :func:`pipeline.images.backbone_pixels` uses for the centre view.
    """
    out = np.empty([views.count, size, size, 3], np.uint8)
    for i in range(views.count):
        box, flip = view_box(image.width, image.height, sha256, views, i)
        view = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
        if flip:
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(view, dtype=np.uint8)
    return out


def reencode_with_views(
    data: bytes,
    sha256: str,
    views: TrainViews,
    *,
    max_pixels: int,
    max_side: int | None,
    quality: int,
    backbone_size: int,
    crop_fraction: float = CROP_SQUASH,
) -> tuple[images.EncodedImage, np.ndarray]:
    """:func:`pipeline.images.reencode` and the image's views, from one decode.

    Returns:
      The encoded image (the same JPEG and centre pixels ``reencode`` makes) and the backbone
      input of the centre and the views, uint8 ``[1 + K, size, size, 3]``.

    Raises:
      ImageError: as ``reencode``.
    """
    image = images.decode_rgb(data, max_pixels=max_pixels, max_side=max_side)
    centre = images.backbone_pixels(image, backbone_size, crop_fraction)
    encoded = images.EncodedImage(
        jpeg=images.encode_jpeg(image, quality),
        height=image.height,
        width=image.width,
        backbone_pixels=centre,
    )
    stacked = np.concatenate([centre[np.newaxis], view_pixels(image, backbone_size, sha256, views)])
    return encoded, stacked


class ViewsModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
    """Wraps an image-embedding handler so that an element may be a stack of images.

    An element is one image ``[S, S, 3]`` (its result: ``[D]``) or a centre and its views
    ``[1 + K, S, S, 3]`` (its result: ``[1 + K, D]``, the centre's first). All images of a
    batch go through the wrapped handler in one call; a batch holds ``batch_size // (1 + K)``
    elements, so about as many images as the wrapped handler's batch.
    """

    def __init__(self, handler: ModelHandler, views: int):
        super().__init__()
        self._handler = handler
        self._per_element = 1 + views

    def load_model(self):
        return self._handler.load_model()

    def run_inference(
        self, batch: Sequence[np.ndarray], model, inference_args: dict[str, Any] | None = None
    ) -> Iterable[PredictionResult]:
        stacks = [x if x.ndim == 4 else x[np.newaxis] for x in batch]
        results = list(self._handler.run_inference(np.concatenate(stacks), model, inference_args))
        embeddings = np.stack([np.asarray(r.inference, np.float32) for r in results])
        out, start = [], 0
        for element, stack in zip(batch, stacks, strict=True):
            rows = embeddings[start : start + len(stack)]
            start += len(stack)
            out.append(PredictionResult(None, rows if element.ndim == 4 else rows[0]))
        return out

    def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
        return sum(x.nbytes for x in batch)

    def get_metrics_namespace(self) -> str:
        return self._handler.get_metrics_namespace()

    def batch_elements_kwargs(self) -> dict[str, Any]:
        kwargs = dict(self._handler.batch_elements_kwargs())
        for key in ("min_batch_size", "max_batch_size"):
            if key in kwargs:
                kwargs[key] = max(1, kwargs[key] // self._per_element)
        return kwargs
