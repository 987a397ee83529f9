"""Unlabeled images: rows with a blank label become the fourth split, ``unlabeled``.

DoFn-level tests of duplicate resolution and ``--label_dict`` first, then runs of the real
preprocess job (tiny backbone) on a CSV that mixes labeled and unlabeled rows, a rerun into the
same output dir, and the trainer on the result.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os

import apache_beam as beam
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from backbones import hub
from backbones.inputs import decode_to_backbone_input
from pipeline import dataset, preprocess, transforms
from pipeline.records import ERRORS, SOURCE_CSV, Row
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from tests.conftest import CLASS_COLOURS, TINY_SIZE, photo, write_dataset

UNLABELED = csv_format.UNLABELED
# Not a class colour: the unlabeled images' embeddings sit away from the labeled ones', so
# statistics computed with them would differ measurably.
GREEN = (40, 200, 60)
slow = pytest.mark.slow  # runs the real job


def _row(line, label, uri="/img/a.jpg", split=None):
    return Row("/d/labels.csv", line, f"{uri},{label}", uri, label, split)


def _resolved(group, sha="0" * 64):
    """(accepted, duplicates, errors) of one content group; sha 0…0 would hash to test."""
    found = {"accepted": [], transforms.DUPLICATES: [], ERRORS: []}
    for out in transforms.ResolveDuplicatesFn(0.1, 0.1).process((sha, group)):
        if isinstance(out, TaggedOutput):
            found[out.tag].append(out.value)
        else:
            found["accepted"].append(out)
    return found["accepted"], found[transforms.DUPLICATES], found[ERRORS]


# --- duplicate resolution and --label_dict -----------------------------------------------------


def test_labeled_copy_wins_and_the_unlabeled_one_is_a_duplicate():
    unlabeled = _row(2, "", "/img/first.jpg")  # listed before the labeled copy
    labeled = _row(5, "rose", "/img/rose.jpg", split=csv_format.TRAIN)
    accepted, duplicates, errors = _resolved([labeled, unlabeled])
    assert accepted == [transforms.Accepted("0" * 64, labeled, csv_format.TRAIN)]
    assert duplicates == [unlabeled]
    assert errors == []


def test_unlabeled_copies_keep_the_first_in_the_unlabeled_split():
    rows = [_row(9, "", "/img/b.jpg"), _row(4, "", "/img/a.jpg"), _row(6, "", "/img/c.jpg")]
    accepted, duplicates, errors = _resolved(rows)
    assert accepted == [transforms.Accepted("0" * 64, rows[1], UNLABELED)]  # not hashed to test
    assert sorted(d.line for d in duplicates) == [6, 9]
    assert errors == []


def test_conflicting_labels_also_reject_the_unlabeled_copy_naming_both_labels():
    rows = [_row(2, "rose"), _row(3, "", "/img/b.jpg"), _row(4, "tulip", "/img/c.jpg")]
    accepted, duplicates, errors = _resolved(rows)
    assert accepted == [] and duplicates == []
    assert sorted(e.line for e in errors) == [2, 3, 4]
    assert {e.category for e in errors} == {"conflicting_labels"}
    unlabeled = next(e for e in errors if e.line == 3)
    assert "'rose'" in unlabeled.reason and "'tulip'" in unlabeled.reason
    rose = next(e for e in errors if e.line == 2)
    assert "'tulip'" in rose.reason and "''" not in rose.reason  # the blank is not a label


def test_label_dict_lets_blank_labels_through_as_unlabeled(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("a.jpg,rose\nb.jpg,\nc.jpg,weed\n")
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(SOURCE_CSV, str(csv_path))])
            | beam.ParDo(transforms.ParseRowsFn(["rose", "tulip"])).with_outputs(
                ERRORS, main="rows"
            )
        )
        assert_that(
            out.rows | beam.Map(lambda r: (r.line, r.label)), equal_to([(1, "rose"), (2, "")])
        )
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.line, e.category)),
            equal_to([(3, "unknown_label")]),
            label="errors",
        )


# --- the job on a mixed CSV ------------------------------------------------------------------


def _green(seed: int) -> bytes:
    return photo(GREEN, (44 + seed % 5, 40), seed=seed)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, tiny_backbone):
    """One run on 18 labeled rows (pinned: one test and one eval image per class) and 14 rows
    with a blank label or about one; returns (root, csv, out, result, manifest)."""
    root = tmp_path_factory.mktemp("unlabeled_images")
    files = write_dataset(root, per_class=6)
    new = root / "new"
    new.mkdir()
    for i in range(6):
        (new / f"u{i}.jpg").write_bytes(_green(100 + i))
    twin = _green(200)
    (new / "twin_a.jpg").write_bytes(twin)
    (new / "twin_b.jpg").write_bytes(twin)
    (new / "copy_of_daisy_0.jpg").write_bytes((root / "daisy" / "daisy_0.jpg").read_bytes())
    (new / "truncated.jpg").write_bytes(_green(300)[:300])
    (new / "pinned.jpg").write_bytes(_green(400))
    lines = [
        "image_uri,label,split",
        "new/copy_of_daisy_0.jpg,,",  # line 2: before its labeled copy, still a duplicate
    ]
    for label, paths in files.items():
        for i, path in enumerate(paths):
            split = {0: csv_format.TEST, 1: csv_format.EVAL}.get(i, "")
            lines.append(f"{path},{label},{split}")
    lines += [f"new/u{i}.jpg,," for i in range(6)]
    lines += [
        "new/twin_a.jpg,,",
        "new/twin_b.jpg,,",  # duplicate of twin_a
        "daisy/daisy_1.jpg,,",  # the same path as a labeled row: duplicate
        "new/truncated.jpg,,",  # line 30: undecodable
        "new/missing.jpg,,",  # unreadable
        "new/pinned.jpg,,train",  # bad_row: a blank label cannot be pinned
        "only-one-cell",  # bad_row, says how to write an unlabeled row
    ]
    csv_path = root / "mixed.csv"
    csv_path.write_text("\n".join(lines) + "\n")
    out = tmp_path_factory.mktemp("unlabeled_out")
    result = preprocess.run(
        [
            f"--input_csv={csv_path}",
            f"--output_dir={out}",
            f"--backbone={tiny_backbone}",
            "--batch_size=8",
            "--eval_fraction=0",
            "--test_fraction=0",
        ]
    )
    return root, csv_path, out, result, manifest_lib.read_manifest(str(out))


def _records(out, split, dim):
    pattern = os.path.join(out, features.tfrecord_pattern(split))
    return [{k: v.numpy() for k, v in r.items()} for r in features.read_dataset(pattern, dim)]


def _errors(out):
    found = []
    for path in glob.glob(os.path.join(out, "errors-*.jsonl")):
        found += [json.loads(line) for line in open(path) if line.strip()]
    return found


@slow
def test_rows_balance_with_unlabeled_duplicates_and_rejections(mixed):
    _, _, _, result, manifest = mixed
    rows = manifest.rows
    assert (rows.read, rows.written, rows.duplicates, rows.rejected) == (32, 25, 3, 4)
    assert rows.balanced()
    assert manifest.rejected_by_reason == {"undecodable": 1, "unreadable": 1, "bad_row": 2}
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query()["counters"]
        if c.key.metric.namespace == "hubflow"
    }
    assert (counters["rows_read"], counters["rows_written"], counters["rows_duplicate"]) == (
        32,
        25,
        3,
    )


@slow
def test_manifest_counts_the_unlabeled_split_and_keeps_it_out_of_the_labels(mixed):
    _, _, out, _, manifest = mixed
    assert manifest.labels == sorted(CLASS_COLOURS)
    assert (out / "labels.txt").read_text() == "".join(f"{x}\n" for x in sorted(CLASS_COLOURS))
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["splits"][UNLABELED] == {"count": 7, "labels": {}}
    per_class = {label: 4 for label in CLASS_COLOURS}
    assert raw["splits"][csv_format.TRAIN] == {"count": 12, "labels": per_class}
    for split in (csv_format.EVAL, csv_format.TEST):
        assert raw["splits"][split] == {"count": 3, "labels": dict.fromkeys(CLASS_COLOURS, 1)}
    assert sum(manifest.split_count(s) for s in csv_format.ALL_SPLITS) == manifest.rows.written


@slow
def test_unlabeled_records_have_embeddings_and_label_minus_one(mixed):
    root, _, out, _, manifest = mixed
    dim = manifest.backbone.embedding_dim
    records = _records(str(out), UNLABELED, dim)
    expected_sources = {str(root / "new" / f"u{i}.jpg") for i in range(6)}
    expected_sources.add(str(root / "new" / "twin_a.jpg"))  # the first of the two copies
    assert {r[features.IMAGE_SOURCE].decode() for r in records} == expected_sources
    model = hub.load(manifest.backbone)
    for r in records:
        assert r[features.LABEL] == features.UNLABELED_INDEX
        assert r[features.LABEL_TEXT] == b""
        source = r[features.IMAGE_SOURCE].decode()
        digest = hashlib.sha256(open(source, "rb").read()).hexdigest()
        assert r[features.IMAGE_SHA256].decode() == digest
        stored = r[features.EMBEDDING]
        assert stored.shape == (dim,) and np.all(np.isfinite(stored))
        backbone = model(
            decode_to_backbone_input(tf.constant([r[features.IMAGE_ENCODED]]), TINY_SIZE)
        ).numpy()[0]
        assert stored @ backbone / (np.linalg.norm(stored) * np.linalg.norm(backbone)) >= 0.98


@slow
def test_labeled_splits_hold_only_labeled_rows_and_the_labeled_copy_wins(mixed):
    root, _, out, _, manifest = mixed
    dim = manifest.backbone.embedding_dim
    labeled = [r for s in csv_format.SPLITS for r in _records(str(out), s, dim)]
    assert len(labeled) == 18
    assert all(0 <= r[features.LABEL] < len(manifest.labels) for r in labeled)
    sources = {r[features.IMAGE_SOURCE].decode() for r in labeled}
    assert str(root / "daisy" / "daisy_0.jpg") in sources
    assert not any("/new/" in s for s in sources)
    test = {r[features.IMAGE_SOURCE].decode() for r in _records(str(out), csv_format.TEST, dim)}
    assert str(root / "daisy" / "daisy_0.jpg") in test  # its pinned split, not the unlabeled one


@slow
def test_unlabeled_rejections_are_error_records_with_source_line_and_reason(mixed):
    _, csv_path, out, _, manifest = mixed
    errors = _errors(str(out))
    assert len(errors) == manifest.rows.rejected
    assert all(e["csv"] == str(csv_path) and e["reason"] for e in errors)
    by_row = {e["row"]: e for e in errors}
    truncated = by_row["new/truncated.jpg,,"]
    assert (truncated["line"], truncated["stage"], truncated["category"]) == (
        30,
        "decode",
        "undecodable",
    )
    assert by_row["new/missing.jpg,,"]["category"] == "unreadable"
    pinned = by_row["new/pinned.jpg,,train"]
    assert pinned["category"] == "bad_row" and "blank label" in pinned["reason"]
    assert "(only-one-cell,,)" in by_row["only-one-cell"]["reason"]


@slow
def test_embedding_statistics_come_from_the_labeled_records_only(mixed):
    import tensorflow_transform as tft

    _, _, out, _, manifest = mixed
    dim = manifest.backbone.embedding_dim
    labeled = np.stack(
        [r[features.EMBEDDING] for s in csv_format.SPLITS for r in _records(str(out), s, dim)]
    )
    unlabeled = np.stack([r[features.EMBEDDING] for r in _records(str(out), UNLABELED, dim)])
    transform = tft.TFTransformOutput(str(out))

    def z_score(x):
        inputs = {features.EMBEDDING: tf.constant(x)}
        return transform.transform_raw_features(inputs, drop_unused_features=True)[
            features.EMBEDDING
        ].numpy()

    varying = labeled.std(axis=0) > 1e-6
    np.testing.assert_allclose(z_score(labeled).mean(axis=0)[varying], 0.0, atol=1e-3)
    np.testing.assert_allclose(z_score(labeled).std(axis=0)[varying], 1.0, atol=1e-2)
    # The statistics of all 25 records would be another normalisation: the test can tell.
    everything = np.concatenate([labeled, unlabeled])
    assert np.abs(z_score(everything).mean(axis=0)[varying]).max() > 0.1


@slow
def test_summary_says_how_many_rows_went_to_the_unlabeled_split(mixed):
    _, _, out, _, manifest = mixed
    summary = dataset.format_summary(manifest, str(out))
    lines = summary.splitlines()
    assert lines[-1] == f"output: {out}"
    assert [line.split() for line in lines if line.startswith(UNLABELED)] == [
        [UNLABELED, "(no", "label)", "7"]
    ]
    assert "rows: read 32 = written 25 (7 of them unlabeled) + duplicates 3 + rejected 4" in lines


@slow
def test_the_trainer_reads_the_labeled_splits_and_never_the_unlabeled_one(mixed, tmp_path):
    from training import data, task
    from training.config import parse_config

    _, _, out, _, manifest = mixed
    config = parse_config([f"--data_dir={out}", f"--model_dir={tmp_path / 'model'}", "--epochs=3"])
    loaded = data.load(config)
    assert set(loaded.files) == set(csv_format.SPLITS)
    assert not any(UNLABELED in os.path.basename(f) for fs in loaded.files.values() for f in fs)
    assert loaded.counts == {s: manifest.split_count(s) for s in csv_format.SPLITS}
    result = task.train(config)
    assert result.metrics[csv_format.EVAL]["examples"] == 3
    assert result.metrics[csv_format.TEST]["examples"] == 3
    assert np.array(result.metrics[csv_format.TEST]["confusion_matrix"]).shape == (3, 3)


# --- reruns ------------------------------------------------------------------------------------


def _run(csv_path, out, backbone, *extra):
    argv = [f"--input_csv={csv_path}", f"--output_dir={out}", f"--backbone={backbone}", *extra]
    preprocess.run(argv)
    return manifest_lib.read_manifest(str(out))


def _shards(out, split):
    return sorted(glob.glob(os.path.join(out, features.tfrecord_pattern(split))))


@slow
def test_rerun_replaces_the_unlabeled_shards_and_label_dict_keeps_blanks_unlabeled(
    tmp_path, tiny_backbone
):
    root = tmp_path / "images"
    files = write_dataset(root, per_class=2)
    for i in range(3):
        (root / f"u{i}.jpg").write_bytes(_green(500 + i))
    labeled = [f"{p},{label}" for label, paths in files.items() for p in paths]
    label_dict = tmp_path / "labels.txt"
    label_dict.write_text("".join(f"{label}\n" for label in CLASS_COLOURS))
    out = tmp_path / "out"
    (tmp_path / "out").mkdir()
    (out / "unlabeled-notes.txt").write_text("mine")  # not in the dataset's layout

    first = root / "first.csv"
    first.write_text("\n".join([*labeled, "u0.jpg,", "u1.jpg,", "u2.jpg,weed"]) + "\n")
    manifest = _run(first, out, tiny_backbone, f"--label_dict={label_dict}")
    assert manifest.split_count(UNLABELED) == 2
    assert manifest.rejected_by_reason == {"unknown_label": 1}  # the blanks are not unknown
    dim = manifest.backbone.embedding_dim
    assert len(_shards(out, UNLABELED)) >= 1

    second = root / "second.csv"
    second.write_text("\n".join([*labeled, "u2.jpg,"]) + "\n")
    manifest = _run(second, out, tiny_backbone, f"--label_dict={label_dict}", "--overwrite")
    assert manifest.split_count(UNLABELED) == 1
    sources = [r[features.IMAGE_SOURCE].decode() for r in _records(str(out), UNLABELED, dim)]
    assert sources == [str(root / "u2.jpg")]

    third = root / "third.csv"
    third.write_text("\n".join(labeled) + "\n")
    manifest = _run(third, out, tiny_backbone, "--overwrite")
    assert manifest.splits[UNLABELED] == {"count": 0, "labels": {}}
    assert _shards(out, UNLABELED) == []  # no unlabeled rows: no unlabeled shard
    assert manifest.rows.written == 6 and manifest.rows.balanced()
    assert (out / "unlabeled-notes.txt").read_text() == "mine"


@slow
def test_only_unlabeled_rows_write_no_labels_and_the_trainer_says_why(tmp_path, tiny_backbone):
    from schemas.cli import UsageError
    from training import data
    from training.config import parse_config

    for i in range(2):
        (tmp_path / f"u{i}.jpg").write_bytes(_green(600 + i))
    csv_path = tmp_path / "only.csv"
    csv_path.write_text("u0.jpg,\nu1.jpg,\n")
    out = tmp_path / "out"
    argv = [f"--input_csv={csv_path}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert preprocess.main(argv) == 0
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.labels == [] and (out / "labels.txt").read_text() == ""
    assert manifest.split_count(UNLABELED) == 2 and manifest.rows.written == 2
    config = parse_config([f"--data_dir={out}", f"--model_dir={tmp_path / 'model'}"])
    with pytest.raises(UsageError, match="train split has no examples"):
        data.load(config)
