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

# Built-in backbones are built locally (no network) into the hubflow cache on first use; their
# handle names the recipe, and each machine resolves it to its own cache path.
BUILTIN_SCHEME = "hubflow-builtin://"

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
    """

    name: str
    handle: str
    image_size: int
    embedding_dim: int | None = None
    value_range: tuple[float, float] = VALUE_RANGE

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "handle": self.handle,
            "image_size": self.image_size,
            "embedding_dim": self.embedding_dim,
            "value_range": list(self.value_range),
        }

    @classmethod
    def from_json(cls, data: dict) -> BackboneSpec:
        return cls(
            name=data["name"],
            handle=data["handle"],
            image_size=int(data["image_size"]),
            embedding_dim=data.get("embedding_dim"),
            value_range=tuple(data.get("value_range", VALUE_RANGE)),
        )


def is_builtin(handle: str) -> bool:
    """True for a built-in backbone's handle (``hubflow-builtin://<name>``)."""
    return handle.startswith(BUILTIN_SCHEME)


def builtin_name(handle: str) -> str:
    """``efficientnet_lite0`` for ``hubflow-builtin://efficientnet_lite0``."""
    return handle[len(BUILTIN_SCHEME) :]
