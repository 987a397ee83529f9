"""The dataset manifest: ``manifest.json`` in every preprocess output dir.

The trainer takes labels, backbone and embedding size from here, never from repeated flags.
``SCHEMA_VERSION`` changes whenever the TFRecord layout or this file changes incompatibly.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import tensorflow as tf

from schemas import csv_format
from schemas.backbones import CROP_OPTION, CROP_SQUASH, RUNTIME_TENSORFLOW, BackboneSpec

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
LABELS_FILE = "labels.txt"
ERRORS_PREFIX = "errors"
ERRORS_SUFFIX = ".jsonl"
TRANSFORM_FN_DIR = "transform_fn"
TRANSFORMED_METADATA_DIR = "transformed_metadata"


@dataclasses.dataclass
class RowCounts:
    """What became of the input rows; ``read == written + duplicates + rejected``."""

    read: int = 0
    written: int = 0
    duplicates: int = 0
    rejected: int = 0

    def balanced(self) -> bool:
        return self.read == self.written + self.duplicates + self.rejected


@dataclasses.dataclass
class Reuse:
    """What an incremental run (``--reuse_from``) took from an earlier dataset.

    Attributes:
      source: the earlier dataset's dir (``--reuse_from``).
      reused: records written with the stored JPEG and embedding of the earlier dataset; the
        other written records were decoded, re-encoded and embedded by this run.
      skipped: why nothing was reused (the earlier dataset was made with other options), or "".
    """

    source: str
    reused: int = 0
    skipped: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"from": self.source, "reused": self.reused, "skipped": self.skipped}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Reuse:
        return cls(str(data["from"]), int(data.get("reused", 0)), str(data.get("skipped", "")))


# The numeric precision the backbone ran in (``--precision``). bfloat16 is TensorFlow's oneDNN
# auto-mixed precision: embeddings within about 0.997-0.999 cosine of float32's, so a dataset
# records which one made them and never mixes them. Manifests from before it read as float32.
PRECISION_FLOAT32 = "float32"
PRECISION_BFLOAT16 = "bfloat16"
PRECISIONS = (PRECISION_FLOAT32, PRECISION_BFLOAT16)


# Augmented train views (``--train_views``): the recipe both sides rely on. A view is a random
# resized crop of the stored image (area fraction and aspect-ratio change drawn uniformly from
# these ranges, the ratio on a log scale) and/or a horizontal flip (p = 0.5), resized to the
# backbone's input size, drawn from (image sha256, seed, view index) alone. VIEW_RECIPE names
# this recipe: change it whenever what a view is changes, so stored views are never mixed.
VIEW_RECIPE = "rrc-flip-1"
VIEW_CROP_AREA = (0.6, 1.0)
VIEW_CROP_RATIO = (3 / 4, 4 / 3)
# The preprocess flags (``Manifest.options`` keys) that record the views; see TrainViews.
VIEW_OPTIONS = {
    "count": "train_views",
    "seed": "view_seed",
    "crop": "view_crop",
    "flip": "view_flip",
    "recipe": "view_recipe",
}


@dataclasses.dataclass(frozen=True)
class TrainViews:
    """How many augmented views of each train image a dataset stores, and how they were made.

    The trainer reads ``count`` to parse the train records; an incremental run (``--reuse_from``)
    takes stored views only from a dataset whose views were made the same way (every field but
    ``count``: view i depends only on the image, the seed and i, so the first K of more views
    are the K views). Recorded in the manifest's ``options`` under the flag names
    :data:`VIEW_OPTIONS`; a manifest without them has no views.
    """

    count: int = 0
    seed: int = 0
    crop: bool = True
    flip: bool = True
    recipe: str = VIEW_RECIPE

    def same_recipe(self, other: TrainViews) -> bool:
        """Whether view i of an image is the same under both (the counts may differ)."""
        return dataclasses.replace(self, count=0) == dataclasses.replace(other, count=0)

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> TrainViews:
        if not options.get(VIEW_OPTIONS["count"]):
            return cls()
        return cls(
            count=int(options[VIEW_OPTIONS["count"]]),
            seed=int(options.get(VIEW_OPTIONS["seed"], 0)),
            crop=bool(options.get(VIEW_OPTIONS["crop"], True)),
            flip=bool(options.get(VIEW_OPTIONS["flip"], True)),
            recipe=str(options.get(VIEW_OPTIONS["recipe"], "")),
        )


@dataclasses.dataclass
class Manifest:
    """Everything a consumer needs to know about one preprocessed dataset."""

    labels: list[str]
    backbone: BackboneSpec
    splits: dict[str, dict[str, Any]]
    rows: RowCounts
    rejected_by_reason: dict[str, int]
    options: dict[str, Any]
    versions: dict[str, str]
    created: str
    # The runtime that computed the embeddings (schemas.backbones.RUNTIME_*). Manifests written
    # before it was recorded came from TensorFlow, the only runtime then.
    inference_runtime: str = RUNTIME_TENSORFLOW
    precision: str = PRECISION_FLOAT32  # what the backbone computed in (PRECISIONS)
    # sha256 over the backbone SavedModel's files (what computed the embeddings), so a later
    # run can tell whether the embeddings are still its own; "" in manifests from before it.
    backbone_sha256: str = ""
    # Only for a run with --reuse_from; absent (None) otherwise and in older manifests. Kept out
    # of ``rows`` so that readers which do not know it (older hubflow) still read the manifest.
    reuse: Reuse | None = None
    schema_version: int = SCHEMA_VERSION

    def train_views(self) -> TrainViews:
        """The augmented views its train records hold (``count`` 0: none)."""
        return TrainViews.from_options(self.options)

    def crop_fraction(self) -> float:
        """How its images were framed into the backbone's input (``--crop_fraction``; 0:
        squashed, as every dataset made before the flag was)."""
        return float(self.options.get(CROP_OPTION, CROP_SQUASH))

    def split_count(self, split: str) -> int:
        return int(self.splits.get(split, {}).get("count", 0))

    def to_json(self) -> dict[str, Any]:
        data = {
            "schema_version": self.schema_version,
            "labels": list(self.labels),
            "backbone": self.backbone.to_json(),
            "backbone_sha256": self.backbone_sha256,
            "inference_runtime": self.inference_runtime,
            "precision": self.precision,
            "splits": self.splits,
            "rows": dataclasses.asdict(self.rows),
            "rejected_by_reason": self.rejected_by_reason,
            "options": self.options,
            "versions": self.versions,
            "created": self.created,
        }
        if self.reuse is not None:
            data["reuse"] = self.reuse.to_json()
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Manifest:
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ValueError(
                f"manifest schema_version {version!r} is not supported (expected {SCHEMA_VERSION}); "
                "rerun hubflow-preprocess with this version of hubflow"
            )
        return cls(
            labels=list(data["labels"]),
            backbone=BackboneSpec.from_json(data["backbone"]),
            splits=data["splits"],
            rows=RowCounts(**data["rows"]),
            rejected_by_reason=data.get("rejected_by_reason", {}),
            options=data.get("options", {}),
            versions=data.get("versions", {}),
            created=data.get("created", ""),
            inference_runtime=data.get("inference_runtime", RUNTIME_TENSORFLOW),
            precision=data.get("precision", PRECISION_FLOAT32),
            backbone_sha256=data.get("backbone_sha256", ""),
            reuse=Reuse.from_json(data["reuse"]) if data.get("reuse") else None,
        )


def empty_splits(labels: list[str]) -> dict[str, dict[str, Any]]:
    """Split table with zero counts for every split (the unlabeled one too) and label."""
    table = {s: {"count": 0, "labels": {label: 0 for label in labels}} for s in csv_format.SPLITS}
    table[csv_format.UNLABELED] = {"count": 0, "labels": {}}
    return table


def labels_text(labels: list[str]) -> str:
    """A labels file's text (``labels.txt``): one label per line, in index order."""
    return "".join(f"{label}\n" for label in labels)


def parse_labels(text: str) -> list[str]:
    """The labels of a labels file's text."""
    return [line for line in text.splitlines() if line]


def manifest_path(data_dir: str) -> str:
    return f"{data_dir.rstrip('/')}/{MANIFEST_FILE}"


def read_manifest(data_dir: str) -> Manifest:
    """Reads and validates ``manifest.json`` from a preprocess output dir (local or gs://)."""
    path = manifest_path(data_dir)
    if not tf.io.gfile.exists(path):
        raise ValueError(f"{path} not found: is {data_dir} a hubflow-preprocess output dir?")
    with tf.io.gfile.GFile(path, "r") as f:
        text = f.read()
    try:
        return Manifest.from_json(json.loads(text))
    except (ValueError, KeyError, TypeError) as e:
        what = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"{path} is not a valid hubflow manifest ({what})") from None
