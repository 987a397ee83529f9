"""Incremental runs (``--reuse_from``): reuse what an earlier dataset stored, embed the rest.

Runs of the real job (tiny backbone) on generated images: a full run A; an incremental rerun
of A in place on a CSV with new images and corrected labels (B); a full run C on the same CSV,
which B must equal record for record; a run from a doctored copy of A, which shows the stored
values are taken as stored and that unreadable records are embedded again; a run whose options
differ from A's. Then the refusals, the dry run and the unit rules.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from apache_beam.ml.inference.base import PredictionResult

from pipeline import dataset, inference, preprocess, reuse, sinks, transforms
from pipeline import images as image_lib
from pipeline.records import Row
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.backbones import BackboneSpec
from tests.conftest import CLASS_COLOURS, photo, write_dataset

slow = pytest.mark.slow  # runs the real job
GREEN = (40, 200, 60)  # unlabeled images: not a class colour


def _argv(csv_path, out, backbone, *extra):
    return [f"--input_csv={csv_path}", f"--output_dir={out}", f"--backbone={backbone}", *extra]


def _records(out) -> dict[str, dict]:
    """sha256 -> the record (numpy values) and its split, over every split of a dataset."""
    dim = manifest_lib.read_manifest(str(out)).backbone.embedding_dim
    found = {}
    for split in csv_format.ALL_SPLITS:
        pattern = os.path.join(out, features.tfrecord_pattern(split))
        if not glob.glob(pattern):
            continue
        for r in features.read_dataset(pattern, dim):
            record = {k: v.numpy() for k, v in r.items()}
            record["split"] = split
            sha = record[features.IMAGE_SHA256].decode()
            assert sha not in found
            found[sha] = record
    return found


def _errors(out) -> list[dict]:
    found = []
    for path in glob.glob(os.path.join(out, "errors-*.jsonl")):
        found += [json.loads(line) for line in open(path) if line.strip()]
    return sorted(found, key=lambda e: (e["line"], e["uri"]))


def _recording(fn, calls: list[str]):
    """``fn(data, ...)`` that also appends the sha256 of ``data`` to ``calls``."""

    def wrapper(data, *args, **kwargs):
        calls.append(hashlib.sha256(data).hexdigest())
        return fn(data, *args, **kwargs)

    return wrapper


def _counters(result) -> dict[str, int]:
    return {
        c.key.metric.name: c.committed
        for c in result.metrics().query()["counters"]
        if c.key.metric.namespace == "hubflow"
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_backbone):
    """A on 21 images (18 labeled, 3 unlabeled); B = A rerun in place with --reuse_from on a CSV
    that adds 3 images and a truncated one, corrects two labels and moves one file; C = a full
    run on B's CSV."""
    root = tmp_path_factory.mktemp("reuse")
    images = root / "images"
    files = write_dataset(images, per_class=6)
    for i in range(3):
        (images / f"u{i}.jpg").write_bytes(photo(GREEN, (44 + i, 40), seed=700 + i))
    base = [f"{p},{label}" for label, paths in files.items() for p in paths]
    first = images / "first.csv"
    first.write_text("\n".join([*base, "u0.jpg,", "u1.jpg,", "u2.jpg,"]) + "\n")

    (images / "new").mkdir()
    for i in range(2):
        (images / "new" / f"d{i}.jpg").write_bytes(
            photo(CLASS_COLOURS["daisy"], (50, 42), seed=900 + i)
        )
    (images / "new" / "u.jpg").write_bytes(photo(GREEN, (46, 44), seed=950))
    cut = photo(GREEN, (46, 44), seed=960)
    (images / "new" / "cut.jpg").write_bytes(cut[: len(cut) * 3 // 4])  # header intact
    (images / "moved").mkdir()
    shutil.copy(images / "rose" / "rose_0.jpg", images / "moved" / "rose_0.jpg")
    second_rows = [
        row.replace("daisy/daisy_3.jpg,daisy", "daisy/daisy_3.jpg,tulip")  # corrected label
        for row in base
        if not row.startswith("rose/rose_0.jpg")  # listed under its new path below
    ]
    second_rows += [
        "moved/rose_0.jpg,rose",
        "u0.jpg,rose",  # was unlabeled, now labeled
        "u1.jpg,",
        "u2.jpg,",
        "new/d0.jpg,daisy",
        "new/d1.jpg,daisy",
        "new/u.jpg,",
        "new/cut.jpg,daisy",  # undecodable: a new image is still fully validated
    ]
    second = images / "second.csv"
    second.write_text("\n".join(second_rows) + "\n")

    out_a, out_b, out_c = root / "A", root / "B", root / "C"
    preprocess.run(_argv(first, out_a, tiny_backbone))
    shutil.copytree(out_a, out_b)
    decoded, reencoded = [], []  # sha256 of the images B fully decodes / re-encodes
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(image_lib, "validate", _recording(image_lib.validate, decoded))
        patch.setattr(image_lib, "reencode", _recording(image_lib.reencode, reencoded))
        result_b = preprocess.run(
            _argv(second, out_b, tiny_backbone, f"--reuse_from={out_b}", "--overwrite")
        )
    preprocess.run(_argv(second, out_c, tiny_backbone))
    return SimpleNamespace(
        root=root,
        images=images,
        first=first,
        second=second,
        a=out_a,
        b=out_b,
        c=out_c,
        result_b=result_b,
        decoded_b=decoded,
        reencoded_b=reencoded,
        backbone=tiny_backbone,
    )


@slow
def test_incremental_run_equals_a_full_run_record_for_record(runs):
    b, c = _records(runs.b), _records(runs.c)
    assert len(c) == 24 and set(b) == set(c)
    for sha, full in c.items():
        incremental = b[sha]
        for key in features.ALL_KEYS:
            if key == features.EMBEDDING:
                np.testing.assert_allclose(incremental[key], full[key], rtol=1e-5, atol=1e-6)
            else:
                assert incremental[key] == full[key], (key, full[features.IMAGE_SOURCE])
        assert incremental["split"] == full["split"]
    assert _errors(runs.b) == _errors(runs.c)
    assert [e["uri"] for e in _errors(runs.c)] == [str(runs.images / "new" / "cut.jpg")]

    manifest_b = manifest_lib.read_manifest(str(runs.b)).to_json()
    manifest_c = manifest_lib.read_manifest(str(runs.c)).to_json()
    assert manifest_b.pop("reuse") == {"from": str(runs.b), "reused": 21, "skipped": ""}
    assert "reuse" not in manifest_c
    options_b, options_c = manifest_b.pop("options"), manifest_c.pop("options")
    assert options_b["reuse_from"] == str(runs.b) and options_c["reuse_from"] is None
    for key in ("output_dir", "overwrite", "reuse_from"):
        options_b.pop(key), options_c.pop(key)
    assert options_b == options_c
    manifest_b.pop("created"), manifest_c.pop("created")
    assert manifest_b == manifest_c
    assert len(manifest_c["backbone_sha256"]) == 64


@slow
def test_statistics_of_the_incremental_run_are_the_full_runs(runs):
    import tensorflow_transform as tft

    embeddings = np.stack([r[features.EMBEDDING] for r in _records(runs.c).values()])

    def z_score(out):
        inputs = {features.EMBEDDING: tf.constant(embeddings)}
        transformed = tft.TFTransformOutput(str(out)).transform_raw_features(
            inputs, drop_unused_features=True
        )
        return transformed[features.EMBEDDING].numpy()

    np.testing.assert_allclose(z_score(runs.b), z_score(runs.c), rtol=1e-4, atol=1e-4)


@slow
def test_the_rerun_reused_every_known_image_and_embedded_only_the_new_ones(runs):
    manifest = manifest_lib.read_manifest(str(runs.b))
    assert manifest.rows.written == 24 and manifest.rows.balanced()
    assert manifest.reuse == manifest_lib.Reuse(str(runs.b), 21, "")
    counters = _counters(runs.result_b)
    assert counters["rows_reused"] == 21 and counters["rows_written"] == 24
    assert "rows_reuse_fallback" not in counters
    summary = dataset.format_summary(manifest, str(runs.b))
    assert f"reused 21 of 24 images (embedded 3) from {runs.b}" in summary.splitlines()


@slow
def test_the_rerun_decodes_and_embeds_only_the_new_images(runs):
    def sha(*parts):
        return hashlib.sha256(runs.images.joinpath(*parts).read_bytes()).hexdigest()

    new = {sha("new", "d0.jpg"), sha("new", "d1.jpg"), sha("new", "u.jpg")}
    assert sorted(runs.reencoded_b) == sorted(new)
    assert sorted(runs.decoded_b) == sorted(new | {sha("new", "cut.jpg")})


@slow
def test_labels_and_sources_come_from_the_new_csv(runs):
    a, b = _records(runs.a), _records(runs.b)
    by_source = {r[features.IMAGE_SOURCE].decode(): r for r in b.values()}
    daisy_3 = by_source[str(runs.images / "daisy" / "daisy_3.jpg")]
    assert daisy_3[features.LABEL_TEXT] == b"tulip"
    assert daisy_3[features.LABEL] == sorted(CLASS_COLOURS).index("tulip")
    u0 = by_source[str(runs.images / "u0.jpg")]
    sha_u0 = u0[features.IMAGE_SHA256].decode()
    assert a[sha_u0]["split"] == csv_format.UNLABELED  # reused from the unlabeled split ...
    assert u0["split"] != csv_format.UNLABELED and u0[features.LABEL_TEXT] == b"rose"  # labeled
    moved = by_source[str(runs.images / "moved" / "rose_0.jpg")]
    sha = moved[features.IMAGE_SHA256].decode()
    assert a[sha][features.IMAGE_SOURCE].decode() == str(runs.images / "rose" / "rose_0.jpg")
    assert moved[features.IMAGE_ENCODED] == a[sha][features.IMAGE_ENCODED]
    assert str(runs.images / "rose" / "rose_0.jpg") not in by_source
    for sha, record in a.items():  # the hash decides the split, before and after
        if record["split"] != csv_format.UNLABELED:
            assert b[sha]["split"] == record["split"]


def _doctor(source, target, dim):
    """A copy of dataset ``source``: half its records with doubled embeddings in one shard, the
    rest in a shard cut short. Returns (doubled shas, shas readable from the cut shard)."""
    records = []
    for path in dataset.shard_paths(str(source)):
        records += list(sinks.read_tfrecords(path))
    records.sort(key=lambda r: reuse.parse_stored(r).sha256)
    half = len(records) // 2
    doubled = []
    for i in range(half):
        example = tf.train.Example.FromString(records[i])
        values = example.features.feature[features.EMBEDDING].float_list.value
        values[:] = [2 * v for v in values]
        assert len(values) == dim
        records[i] = example.SerializeToString()
        doubled.append(reuse.parse_stored(records[i]).sha256)
    target.mkdir()
    shutil.copy(source / manifest_lib.MANIFEST_FILE, target / manifest_lib.MANIFEST_FILE)
    sinks.write_tfrecords(str(target / "train-00000-of-00002.tfrecord"), records[:half])
    cut = target / "unlabeled-00000-of-00001.tfrecord"
    sinks.write_tfrecords(str(cut), records[half:])
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size * 2 // 3])
    readable = []
    with pytest.raises(Exception):  # noqa: B017, PT011 - whatever the reader raises at the cut
        for record in sinks.read_tfrecords(str(cut)):
            readable.append(reuse.parse_stored(record).sha256)
    assert 0 < len(readable) < len(records) - half
    return doubled, readable


@slow
def test_stored_values_are_taken_as_stored_and_unreadable_ones_embedded_again(runs, tmp_path):
    dim = manifest_lib.read_manifest(str(runs.a)).backbone.embedding_dim
    doctored = tmp_path / "doctored"
    doubled, readable = _doctor(runs.a, doctored, dim)
    out = tmp_path / "out"
    result = preprocess.run(_argv(runs.second, out, runs.backbone, f"--reuse_from={doctored}"))
    got, full = _records(out), _records(runs.c)
    assert set(got) == set(full)
    for sha, record in got.items():
        expected = full[sha][features.EMBEDDING] * (2 if sha in doubled else 1)
        np.testing.assert_allclose(record[features.EMBEDDING], expected, rtol=1e-5, atol=1e-6)
        assert record[features.IMAGE_ENCODED] == full[sha][features.IMAGE_ENCODED]
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.reuse.reused == len(doubled) + len(readable) < 21
    assert manifest.rows.written == 24 and manifest.rows.balanced()
    assert _counters(result)["rows_reused"] == manifest.reuse.reused


@slow
def test_other_image_options_reuse_nothing_and_say_why_in_one_line(runs, tmp_path, capsys, caplog):
    out = tmp_path / "out"
    argv = _argv(runs.second, out, runs.backbone, f"--reuse_from={runs.a}", "--jpeg_quality=80")
    assert preprocess.main(argv) == 0
    captured = capsys.readouterr()
    why = "it was made with --jpeg_quality 95, this run uses 80"
    warnings = [r.getMessage() for r in caplog.records if "--reuse_from" in r.getMessage()]
    assert warnings == [f"--reuse_from {runs.a}: reusing nothing: {why}"]
    assert all(r.levelname == "WARNING" for r in caplog.records if "reusing" in r.getMessage())
    assert f"reused 0 of 24 images (embedded 24): {runs.a}: {why}" in captured.out.splitlines()
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.reuse == manifest_lib.Reuse(str(runs.a), 0, why)
    assert manifest.rows.written == 24
    got, full = _records(out), _records(runs.c)
    assert set(got) == set(full)
    sha = next(iter(got))
    assert got[sha][features.IMAGE_ENCODED] != full[sha][features.IMAGE_ENCODED]  # re-encoded


@pytest.mark.parametrize("content", [None, "{}"], ids=["no manifest", "not a manifest"])
def test_a_dir_that_is_not_a_hubflow_dataset_is_refused_in_one_line(
    content, tiny_backbone, tmp_path, capsys
):
    previous = tmp_path / "previous"
    previous.mkdir()
    (previous / "train-00000-of-00001.tfrecord").write_bytes(b"")
    if content is not None:
        (previous / manifest_lib.MANIFEST_FILE).write_text(content)
    images = tmp_path / "images"
    write_dataset(images, per_class=1)
    argv = [f"--image_dir={images}", f"--output_dir={tmp_path / 'out'}"]
    argv += [f"--backbone={tiny_backbone}", f"--reuse_from={previous}"]
    assert preprocess.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hubflow-preprocess: error: --reuse_from: ")
    assert str(previous) in err[0]
    assert not glob.glob(str(tmp_path / "out" / "*.tfrecord"))


def test_dry_run_names_a_remote_reuse_from_and_reads_nothing_of_it(
    tiny_backbone, tmp_path, capsys, no_gcs
):
    images = tmp_path / "images"
    write_dataset(images, per_class=1)
    argv = [f"--image_dir={images}", f"--output_dir={tmp_path / 'out'}"]
    argv += [f"--backbone={tiny_backbone}", "--reuse_from=gs://my-bucket/old", "--dry_run=True"]
    assert preprocess.main(argv) == 0
    out = capsys.readouterr().out
    assert "--reuse_from gs://my-bucket/old: not read in a dry run" in out
    steps = out.split("steps (", 1)[1].split("\n", 1)[0]
    assert "MatchPrevious" in steps and "GroupByShard" in steps and "GroupByContent" not in steps
    assert not (tmp_path / "out").exists()


# --- unit rules -----------------------------------------------------------------------------


SPEC = BackboneSpec("tiny", "/models/tiny", 32, 16)
OPTIONS = {"max_image_side": 512, "jpeg_quality": 95}


def _previous(**changes):
    fields = dict(
        labels=["a"],
        backbone=SPEC,
        splits=manifest_lib.empty_splits(["a"]),
        rows=manifest_lib.RowCounts(1, 1, 0, 0),
        rejected_by_reason={},
        options=dict(OPTIONS),
        versions={},
        created="then",
        inference_runtime="tflite",
        backbone_sha256="ab" * 32,
    )
    fields.update(changes)
    return manifest_lib.Manifest(**fields)


def _mismatch(previous, **now):
    args = dict(
        backbone=SPEC,
        backbone_sha256="ab" * 32,
        runtime="tflite",
        max_image_side=512,
        jpeg_quality=95,
    )
    args.update(now)
    return reuse.mismatch(previous, **args)


def test_the_same_backbone_runtime_and_image_options_match_whatever_else_differs():
    previous = _previous(
        options={**OPTIONS, "max_image_pixels": 10, "eval_fraction": 0.5, "batch_size": 4},
        backbone=BackboneSpec("renamed", "/elsewhere/tiny", 32, 16),
    )
    assert _mismatch(previous) is None


@pytest.mark.parametrize(
    "previous, now, expected",
    [
        ({"backbone_sha256": ""}, {}, "records no backbone digest"),
        ({"backbone_sha256": "cd" * 32}, {}, "another backbone (/models/tiny, sha256 cdcdcd"),
        ({}, {"backbone": BackboneSpec("tiny", "/models/tiny", 64, 16)}, "input size is 32"),
        ({}, {"backbone": BackboneSpec("tiny", "/models/tiny", 32, 8)}, "embedding size is 16"),
        ({}, {"runtime": "tensorflow"}, "computed with tflite, this run embeds with tensorflow"),
        ({}, {"max_image_side": None}, "--max_image_side 512, this run uses 0 (original size)"),
        ({}, {"jpeg_quality": 90}, "--jpeg_quality 95, this run uses 90"),
        ({"options": {}}, {}, "does not record --max_image_side"),
    ],
)
def test_what_differs_is_named(previous, now, expected):
    assert expected in _mismatch(_previous(**previous), **now)


def test_manifests_without_the_new_fields_still_read_and_reuse_round_trips():
    data = _previous().to_json()
    assert "reuse" not in data
    del data["backbone_sha256"]
    old = manifest_lib.Manifest.from_json(data)
    assert old.backbone_sha256 == "" and old.reuse is None
    with_reuse = _previous(reuse=manifest_lib.Reuse("/d", 3, ""))
    assert manifest_lib.Manifest.from_json(with_reuse.to_json()) == with_reuse
    assert with_reuse.to_json()["rows"] == {"read": 1, "written": 1, "duplicates": 0, "rejected": 0}


def test_rows_whose_shard_is_gone_fall_back_to_the_normal_path(tmp_path):
    row = Row("/d/l.csv", 1, "a.jpg,a", "/d/a.jpg", "a")
    accepted = transforms.Accepted("0" * 64, row, csv_format.TRAIN)
    missing = str(tmp_path / "train-00000-of-00001.tfrecord")
    assert list(reuse.StoredReader(16)(reuse.ShardRows(missing, [accepted]))) == [accepted]
    assert list(reuse.IndexShardFn().process(missing)) == []


def test_a_malformed_stored_record_is_not_used(tmp_path):
    def example(embedding, jpeg=b"\xff\xd8jpeg"):
        return features.make_example(
            jpeg=jpeg,
            height=4,
            width=5,
            source="/d/a.jpg",
            sha256="0" * 64,
            label=0,
            label_text="a",
            embedding=embedding,
        ).SerializeToString()

    good = reuse.parse_stored(example(np.ones(16)))
    assert reuse.stored_problem(good, 16) is None and (good.height, good.width) == (4, 5)
    assert "expected 16" in reuse.stored_problem(reuse.parse_stored(example(np.ones(8))), 16)
    nan = reuse.parse_stored(example(np.full(16, np.nan)))
    assert reuse.stored_problem(nan, 16) == "non-finite embedding"
    assert reuse.stored_problem(reuse.parse_stored(example(np.ones(16), b"")), 16) == "no JPEG"


def test_a_record_that_is_not_an_example_is_skipped_and_the_rest_of_its_shard_read(tmp_path):
    def example(sha):
        return features.make_example(
            jpeg=b"\xff\xd8jpeg",
            height=4,
            width=5,
            source="/d/old.jpg",
            sha256=sha,
            label=0,
            label_text="a",
            embedding=np.full(16, 0.5),
        ).SerializeToString()

    first, second = "1" * 64, "2" * 64
    shard = str(tmp_path / "train-00000-of-00001.tfrecord")
    sinks.write_tfrecords(shard, [example(first), b"not an example", example(second)])
    assert list(reuse.IndexShardFn().process(shard)) == [(first, shard), (second, shard)]
    rows = [Row("/d/l.csv", i, f"{i}.jpg,b", f"/d/{i}.jpg", "b") for i in (1, 2)]
    wanted = [
        transforms.Accepted(sha, row, csv_format.EVAL)
        for sha, row in zip((first, second), rows, strict=True)
    ]
    out = list(reuse.StoredReader(16)(reuse.ShardRows(shard, wanted)))
    assert [encoded.accepted for encoded, _ in out] == wanted
    assert all(encoded.reused and encoded.jpeg == b"\xff\xd8jpeg" for encoded, _ in out)
    assert all(np.all(embedded.inference == 0.5) for _, embedded in out)


def test_stored_images_stream_to_the_writer_instead_of_piling_up(tmp_path, tiny_backbone):
    """Each stored image is written a batch or so after it is read, not after the whole shard.

    Joining stored and newly embedded images with a Flatten made the DirectRunner hold every
    stored JPEG in memory until all were read (5.6 GB peak RSS on 10,000 photos).
    """
    images = tmp_path / "images"
    write_dataset(images, per_class=16)  # 48 images
    earlier, out = tmp_path / "earlier", tmp_path / "out"
    flags = ["--eval_fraction=0", "--test_fraction=0", "--batch_size=4"]
    preprocess.run(
        [f"--image_dir={images}", f"--output_dir={earlier}", f"--backbone={tiny_backbone}", *flags]
    )
    built, lags = [0], []
    read = reuse.StoredReader.__call__
    to_example = transforms.ToExampleFn.process

    def reading(self, group):
        for out in read(self, group):
            if not isinstance(out, transforms.Accepted):
                lags.append(len(lags) + 1 - built[0])  # read so far - written so far
            yield out

    def building(self, element, *args, **kwargs):
        built[0] += 1
        yield from to_example(self, element, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(reuse.StoredReader, "__call__", reading)
        patch.setattr(transforms.ToExampleFn, "process", building)
        preprocess.run(
            [f"--image_dir={images}", f"--output_dir={out}", f"--backbone={tiny_backbone}",
             f"--reuse_from={earlier}", *flags]
        )  # fmt: skip
    assert manifest_lib.read_manifest(str(out)).reuse.reused == len(lags) == 48
    assert max(lags) <= 2 * 4  # at most about a batch in RunInference's buffer, not 48


def test_run_inference_passes_embedded_elements_through_in_order():
    calls = []

    class Doubling:
        def run_inference(self, batch, model, inference_args=None):
            calls.append(len(batch))
            return [PredictionResult(None, 2 * x) for x in batch]

    handler = inference.PassEmbeddedModelHandler(Doubling())
    stored = [inference.Embedded(np.full(2, 7.0)), inference.Embedded(np.full(2, 8.0))]
    batch = [stored[0], np.ones(2), stored[1], np.full(2, 3.0)]
    out = [r.inference.tolist() for r in handler.run_inference(batch, model=None)]
    assert out == [[7, 7], [2, 2], [8, 8], [6, 6]]
    assert calls == [2]  # the two new images, in one call
    assert [r.inference.tolist() for r in handler.run_inference(stored, None)] == [[7, 7], [8, 8]]
    assert calls == [2]  # a batch of stored images never reaches the model
