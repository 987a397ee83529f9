"""Start-up shortcuts of the preprocessing job (issue 12, item 4): what a warm rerun skips.

A rerun with the same backbone files neither loads the SavedModel to learn its sizes (the probe
record, :func:`backbones.hub.describe`) nor converts and checks it again (the TFLite entry), yet
records the same backbone, digest and runtime; a corrupted or unreadable cache entry is rebuilt,
never trusted and never a crash. The label vocabulary no longer goes through tf.Transform: it
must still be alphabetical whatever the label frequencies.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from backbones import cache, hub, registry, tflite_runtime
from pipeline import analyze, preprocess
from schemas import manifest as manifest_lib
from schemas.backbones import RUNTIME_TFLITE
from tests.conftest import TINY_DIM, TINY_SIZE, write_dataset


@pytest.fixture
def hubflow_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("HUBFLOW_CACHE", str(path))
    return path


@pytest.fixture
def loads(monkeypatch) -> list[str]:
    """Every SavedModel load through TF-Hub (the probe's and the workers')."""
    import tensorflow_hub

    calls: list[str] = []
    real = tensorflow_hub.load

    def counting(handle, *args, **kwargs):
        calls.append(handle)
        return real(handle, *args, **kwargs)

    monkeypatch.setattr(tensorflow_hub, "load", counting)
    return calls


@pytest.fixture
def backbone(tmp_path, tiny_backbone) -> str:
    """A private copy of the tiny backbone (tests change its files)."""
    return shutil.copytree(tiny_backbone, tmp_path / "backbone").as_posix()


def _record_dir(hubflow_cache) -> str:
    folder = hubflow_cache / hub.PROBE_SUBDIR
    (entry,) = [p for p in folder.iterdir() if p.is_dir()]
    return str(entry)


def _describe(handle: str, image_size: int | None = None):
    spec, digest = hub.describe(registry.resolve(handle, image_size))
    hub.release(spec)  # as a TFLite job does: no worker load in this process
    return spec, digest


def test_a_second_describe_reads_the_record_instead_of_loading_the_model(
    hubflow_cache, loads, backbone
):
    first, digest = _describe(backbone)
    assert len(loads) == 1
    assert (first.image_size, first.embedding_dim) == (TINY_SIZE, TINY_DIM)
    assert digest == hub.content_digest(backbone)

    again, again_digest = _describe(backbone)
    assert len(loads) == 1  # no second load
    assert (again, again_digest) == (first, digest)


def test_changed_files_or_another_image_size_are_probed_again(hubflow_cache, loads, backbone):
    first, digest = _describe(backbone)
    with open(os.path.join(backbone, "assets", "note.txt"), "w") as f:
        f.write("another model's files\n")  # same sizes, other content: another digest
    changed, changed_digest = _describe(backbone)
    assert len(loads) == 2 and changed_digest != digest
    assert changed == first

    sized, _ = _describe(backbone, image_size=TINY_SIZE)  # --image_size is part of the key
    assert len(loads) == 3 and sized == first


def _reseal(entry: str, text: str) -> None:
    """Rewrites the record file and its digest alike: an entry sealed by a faulty writer."""
    with open(os.path.join(entry, hub.PROBE_RECORD_FILE), "w") as f:
        f.write(text)
    cache.record(entry)


@pytest.mark.parametrize(
    "damage",
    ["truncated", "record_missing", "resealed_garbage", "resealed_wrong_digest", "resealed_zero"],
)
def test_a_corrupt_probe_record_is_ignored_and_rebuilt(
    hubflow_cache, loads, backbone, caplog, damage
):
    first, digest = _describe(backbone)
    entry = _record_dir(hubflow_cache)
    path = os.path.join(entry, hub.PROBE_RECORD_FILE)
    with open(path) as f:
        record = json.load(f)
    if damage == "truncated":  # a half-written copy: the digest no longer matches
        with open(path, "r+") as f:
            f.truncate(10)
    elif damage == "record_missing":  # killed between the rename and the digest record
        os.unlink(cache.record_path(entry))
    elif damage == "resealed_garbage":
        _reseal(entry, "{not json")
    elif damage == "resealed_wrong_digest":
        _reseal(entry, json.dumps({**record, "backbone_sha256": "0" * 64}))
    else:
        record["backbone"]["embedding_dim"] = 0
        _reseal(entry, json.dumps(record))

    with caplog.at_level(logging.WARNING, logger="backbones"):
        again, again_digest = _describe(backbone)
    assert (again, again_digest) == (first, digest)
    assert len(loads) == 2  # probed again, not trusted
    assert any("not loading the cached probe record" in m for m in caplog.messages)
    assert _describe(backbone)[0] == first and len(loads) == 2  # the rebuilt one is used


def test_a_backbone_that_fails_is_not_recorded(hubflow_cache, tmp_path):
    missing = str(tmp_path / "no_model")
    for _ in range(2):  # tried again each time, one line naming the flag
        with pytest.raises(ValueError, match="^--backbone: cannot load"):
            _describe(missing)
    folder = hubflow_cache / hub.PROBE_SUBDIR
    assert not folder.exists() or not [p for p in folder.iterdir() if p.is_dir()]


def test_without_a_writable_cache_the_backbone_is_probed(tmp_path, monkeypatch, loads, backbone):
    not_a_dir = tmp_path / "cache-file"
    not_a_dir.write_text("")
    monkeypatch.setenv("HUBFLOW_CACHE", str(not_a_dir))
    for expected_loads in (1, 2):
        spec, digest = _describe(backbone)
        assert (spec.image_size, spec.embedding_dim) == (TINY_SIZE, TINY_DIM)
        assert digest == hub.content_digest(backbone) and len(loads) == expected_loads


def test_a_conversion_entry_with_an_unreadable_record_is_converted_again(
    hubflow_cache, backbone, monkeypatch, caplog
):
    conversions = []
    real = tflite_runtime._convert
    monkeypatch.setattr(tflite_runtime, "_convert", lambda *a: conversions.append(1) or real(*a))
    spec, digest = _describe(backbone)
    first = tflite_runtime.resolve(spec, "auto", digest=digest)
    assert tflite_runtime.resolve(spec, "auto", digest=digest) == first
    assert len(conversions) == 1  # converted and parity-checked once

    with open(os.path.join(first.model_dir, tflite_runtime.RECORD_FILE), "w") as f:
        f.write('{"converted": true}')  # sealed, but not a record this version can use
    cache.record(first.model_dir)
    with caplog.at_level(logging.WARNING, logger="backbones"):
        again = tflite_runtime.resolve(spec, "auto", digest=digest)
    assert len(conversions) == 2 and again.name == RUNTIME_TFLITE
    assert again.model_sha256 == first.model_sha256
    assert any("not loading the cached TFLite conversion" in m for m in caplog.messages)


@pytest.mark.slow
def test_a_warm_rerun_loads_and_converts_nothing_and_records_the_same(
    hubflow_cache, loads, backbone, tmp_path, monkeypatch
):
    conversions = []
    real = tflite_runtime._convert
    monkeypatch.setattr(tflite_runtime, "_convert", lambda *a: conversions.append(1) or real(*a))
    write_dataset(tmp_path / "images", per_class=2)
    manifests = []
    for run in ("cold", "warm"):
        out = tmp_path / run
        preprocess.run(
            [f"--image_dir={tmp_path / 'images'}", f"--output_dir={out}", f"--backbone={backbone}"]
        )
        manifests.append(manifest_lib.read_manifest(str(out)))
        if run == "cold":
            assert len(loads) == 1 and len(conversions) == 1
    assert len(loads) == 1 and len(conversions) == 1  # the warm run did neither
    cold, warm = manifests
    assert warm.inference_runtime == cold.inference_runtime == RUNTIME_TFLITE
    assert warm.backbone == cold.backbone and warm.backbone.embedding_dim == TINY_DIM
    assert warm.backbone_sha256 == cold.backbone_sha256 == hub.content_digest(backbone)
    assert warm.rows.written == cold.rows.written == 6


@pytest.mark.parametrize(
    "labels, expected",
    [
        (
            ["rose", "daisy", "rose", "tulip", "rose", "Zinnia"],
            ["Zinnia", "daisy", "rose", "tulip"],
        ),
        ([], []),
    ],
)
def test_the_label_vocabulary_is_alphabetical_whatever_the_frequencies(labels, expected):
    with TestPipeline() as p:
        vocabulary = p | beam.Create(labels, reshuffle=False) | analyze.LabelVocabulary()
        assert_that(vocabulary, equal_to([expected]))
