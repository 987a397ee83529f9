"""Invariants of the data contract in schemas/."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest
import tensorflow as tf

from schemas import backbones, csv_format, errors, features, manifest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CODE_DIRS = ("backbones", "evaluation", "pipeline", "training", "demo", "benchmarks")


def test_feature_keys_are_exactly_the_contract():
    assert set(features.ALL_KEYS) == {
        "image/encoded",
        "image/format",
        "image/height",
        "image/width",
        "image/source",
        "image/sha256",
        "label",
        "label/text",
        "embedding",
    }


@pytest.mark.parametrize("key", [k for k in features.ALL_KEYS if "/" in k])
def test_no_feature_key_literal_outside_schemas(key):
    # Keys with a slash are unambiguous string literals; "label"/"embedding" are common words.
    offenders = []
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            if re.search(rf"[\"']{re.escape(key)}[\"']", path.read_text()):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, f"{key!r} spelled outside schemas/: {offenders}"


def test_example_round_trips_through_parse_spec():
    example = features.make_example(
        jpeg=b"\xff\xd8fake",
        height=3,
        width=4,
        source="gs://b/x.jpg",
        sha256="ab" * 32,
        label=2,
        label_text="tulip",
        embedding=[0.5, -1.0, 2.0],
    )
    parsed = features.parse_examples(tf.constant([example.SerializeToString()]), 3)
    assert parsed[features.LABEL].numpy().tolist() == [2]
    assert parsed[features.LABEL_TEXT].numpy().tolist() == [b"tulip"]
    assert parsed[features.IMAGE_FORMAT].numpy().tolist() == [b"jpeg"]
    assert parsed[features.IMAGE_SHA256].numpy()[0].decode() == "ab" * 32
    np.testing.assert_allclose(parsed[features.EMBEDDING].numpy(), [[0.5, -1.0, 2.0]])
    with pytest.raises(tf.errors.InvalidArgumentError):
        features.parse_examples(tf.constant([example.SerializeToString()]), 4)


def test_metadata_schema_matches_spec():
    schema = features.metadata_schema(7)
    assert sorted(f.name for f in schema.feature) == sorted(features.ALL_KEYS)


def test_manifest_rejects_other_schema_version(tmp_path):
    spec = backbones.BackboneSpec("x", "/m", 32, 16)
    m = manifest.Manifest(
        labels=["a"],
        backbone=spec,
        splits=manifest.empty_splits(["a"]),
        rows=manifest.RowCounts(1, 1, 0, 0),
        rejected_by_reason={},
        options={},
        versions={},
        created="now",
    )
    data = m.to_json()
    assert manifest.Manifest.from_json(data).backbone == spec
    data["schema_version"] = manifest.SCHEMA_VERSION + 1
    with pytest.raises(ValueError, match="schema_version"):
        manifest.Manifest.from_json(data)


def test_split_names_are_the_csv_contract():
    assert csv_format.SPLITS == ("train", "eval", "test")


@pytest.mark.parametrize("word", errors.CATEGORIES)
def test_no_error_category_literal_outside_schemas(word):
    """Categories are written to errors files and counted in the manifest: one spelling."""
    offenders = [
        str(path.relative_to(ROOT))
        for folder in CODE_DIRS
        for path in (ROOT / folder).rglob("*.py")
        if re.search(rf"[\"']{re.escape(word)}[\"']", path.read_text())
    ]
    assert not offenders, f"{word!r} spelled outside schemas/errors.py: {offenders}"
