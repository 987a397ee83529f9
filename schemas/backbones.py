"""The backbone record of the contract: :class:`BackboneSpec`, as the manifest stores it.

A backbone is a TF-Hub-format feature-vector model: it takes float32 RGB images of shape
``[N, size, size, 3]`` with values in ``[0, 1]`` and returns ``[N, D]`` features. The spec names
it, says where it comes from and states that input contract. Which backbones exist, how they
are built, cached and loaded is the business of the :mod:`backbones` package.
"""

from __future__ import annotations

import dataclasses

# TF-Hub image modules expect RGB in [0, 1]; normalisation specific to a network lives inside it.
VALUE_RANGE = (0.0, 1.0)

# How an image is framed into the square input (``--crop_fraction``). 0 squashes the whole
# image to ``size x size`` (aspect ratio not kept). A fraction F in (0, 1] scales the image,
# keeping its aspect ratio, so that its shorter side is ``round(size / F)`` pixels, then takes the
# centred ``size x size`` square: the ImageNet evaluation framing the EfficientNet-Lite weights
# were measured with at F = 0.875. Every path that feeds a backbone (the preprocessing job, image
# training, the export) frames by :func:`crop_box`; manifests from before it was recorded were
# squashed (0).
CROP_SQUASH = 0.0
DEFAULT_CROP_FRACTION = 0.875
CROP_OPTION = "crop_fraction"  # the preprocess flag, as ``Manifest.options`` records it

# Built-in backbones are built locally (no network) into the hubflow cache on first use; their
# handle names the recipe, and each machine resolves it to its own cache path.
BUILTIN_SCHEME = "hubflow-builtin://"

# Several backbones at once (``--backbone a,b``): one composite backbone whose features are the
# parts' features concatenated in the order given. Each part sees the composite's input resized
# to its own input size (bilinear; the composite's input is the largest part's). Its handle
# lists the parts' handles, ``hubflow-concat://<handle>,<handle>``; each machine builds the
# composite SavedModel from the parts into its own cache (backbones.composite).
BACKBONE_SEPARATOR = ","
CONCAT_SCHEME = "hubflow-concat://"

# How preprocessing runs the backbone (``--inference_runtime``). The manifest records the runtime
# actually used, tensorflow or tflite; ``auto`` picks one per job.
RUNTIME_AUTO = "auto"
RUNTIME_TENSORFLOW = "tensorflow"
RUNTIME_TFLITE = "tflite"
INFERENCE_RUNTIMES = (RUNTIME_AUTO, RUNTIME_TENSORFLOW, RUNTIME_TFLITE)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A backbone and its input contract.

    Attributes:
      name: preset name, or the handle itself for non-preset backbones.
      handle: TF-Hub / Kaggle URL, a local SavedModel directory, or ``hubflow-builtin://<name>``.
      image_size: square input side in pixels.
      embedding_dim: feature-vector length, or None until the model has been probed.
      value_range: range of the float input values.
      parts: for a composite backbone (``--backbone a,b``), the backbones whose features it
        concatenates, in order; empty for a single backbone.
    """

    name: str
    handle: str
    image_size: int
    embedding_dim: int | None = None
    value_range: tuple[float, float] = VALUE_RANGE
    parts: tuple[BackboneSpec, ...] = ()

    def feature_ranges(self) -> list[tuple[str, int, int]]:
        """``(part name, start, end)`` of each part's features in the embedding; one entry
        covering all of it for a single backbone."""
        if not self.parts:
            return [(self.name, 0, self.embedding_dim or 0)]
        ranges, start = [], 0
        for part in self.parts:
            ranges.append((part.name, start, start + (part.embedding_dim or 0)))
            start += part.embedding_dim or 0
        return ranges

    def to_json(self) -> dict:
        data = {
            "name": self.name,
            "handle": self.handle,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "value_range": list(self.value_range),
        }
        if self.parts:
            data["parts"] = [part.to_json() for part in self.parts]
        return data

    @classmethod
    def from_json(cls, data: dict) -> BackboneSpec:
        return cls(
            name=data["name"],
            handle=data["handle"],
            image_size=int(data["image_size"]),
            embedding_dim=data.get("embedding_dim"),
            value_range=tuple(data.get("value_range", VALUE_RANGE)),
            parts=tuple(cls.from_json(part) for part in data.get("parts", ())),
        )


def is_builtin(handle: str) -> bool:
    """True for a built-in backbone's handle (``hubflow-builtin://<name>``)."""
    return handle.startswith(BUILTIN_SCHEME)


def builtin_name(handle: str) -> str:
    """``efficientnet_lite0`` for ``hubflow-builtin://efficientnet_lite0``."""
    return handle[len(BUILTIN_SCHEME) :]


def is_concat(handle: str) -> bool:
    """True for a composite backbone's handle (``hubflow-concat://<handle>,<handle>``)."""
    return handle.startswith(CONCAT_SCHEME)


def concat_handle(handles: list[str]) -> str:
    """The composite handle of ``handles``, in order."""
    return CONCAT_SCHEME + BACKBONE_SEPARATOR.join(handles)


def concat_parts(handle: str) -> list[str]:
    """The part handles of a composite handle, in order."""
    return handle[len(CONCAT_SCHEME) :].split(BACKBONE_SEPARATOR)


def crop_side(size: int, crop_fraction: float) -> int:
    """The shorter side an image is scaled to before its centred ``size`` square is taken."""
    return max(size, round(size / crop_fraction))


def crop_box(width, height, size: int, crop_fraction: float, minimum=min):
    """``(scaled width, scaled height, left, top)`` of the centre crop of a ``width x height``
    image for a ``size`` input at ``crop_fraction`` (> 0; see :data:`DEFAULT_CROP_FRACTION`).

    Integer arithmetic (round half up) on Python ints, or on integer tensors with
    ``minimum=tf.minimum``: the Pillow path and the graph (``backbones.inputs``) compute the
    same box from this one definition.
    """
    short = crop_side(size, crop_fraction)
    shorter = minimum(width, height)
    scaled_w = (width * short + shorter // 2) // shorter
    scaled_h = (height * short + shorter // 2) // shorter
    return scaled_w, scaled_h, (scaled_w - size) // 2, (scaled_h - size) // 2
