"""End-to-end runs of the preprocessing job on generated images with a tiny backbone."""

from __future__ import annotations

import glob
import hashlib
import json
import os

import numpy as np
import pytest
import tensorflow as tf

from backbones import hub
from backbones.inputs import decode_to_backbone_input
from pipeline import preprocess
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.errors import CATEGORIES, ERROR_FIELDS, STAGES
from tests.conftest import CLASS_COLOURS, photo, write_dataset

pytestmark = pytest.mark.slow


def _bad_inputs(root):
    """Writes broken files next to the good ones; returns their relative paths."""
    good = (root / "daisy" / "daisy_0.jpg").read_bytes()
    (root / "bad").mkdir()
    (root / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bad" / "empty.jpg").write_bytes(b"")
    (root / "bad" / "text.jpg").write_bytes(b"this is not an image\n")
    (root / "bad" / "copy_of_daisy_0.jpg").write_bytes(good)  # same content, same label
    (root / "bad" / "rose_lookalike.jpg").write_bytes((root / "rose" / "rose_1.jpg").read_bytes())
    (root / "extra").mkdir()
    (root / "extra" / "rgba.png").write_bytes(
        photo(CLASS_COLOURS["tulip"], fmt="PNG", mode="RGBA", seed=7)
    )


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    files = write_dataset(root, per_class=12)
    _bad_inputs(root)
    lines = ["image_uri,label"]
    for label, paths in files.items():
        lines += [f"{p},{label}" for p in paths]
    lines += [
        "",  # blank: not a row
        "bad/truncated.jpg,daisy",
        "bad/empty.jpg,rose",
        "bad/text.jpg,tulip",
        "bad/missing.jpg,tulip",
        "bad/copy_of_daisy_0.jpg,daisy",  # duplicate of daisy/daisy_0.jpg
        "daisy/daisy_0.jpg,daisy",  # the same path listed twice: duplicate
        "bad/rose_lookalike.jpg,tulip",  # conflicts with rose/rose_1.jpg -> both rejected
        "only-one-column",
        f"{root / 'extra' / 'rgba.png'},tulip",  # absolute path
    ]
    csv_path = root / "labels.csv"
    csv_path.write_text("\ufeff" + "\r\n".join(lines) + "\r\n", encoding="utf-8")
    return root, csv_path


def _run(csv_path, out, backbone, *extra):
    argv = [
        f"--input_csv={csv_path}",
        f"--output_dir={out}",
        f"--backbone={backbone}",
        "--batch_size=8",
        "--eval_fraction=0.2",
        "--test_fraction=0.2",
        *extra,
    ]
    result = preprocess.run(argv)
    return result, manifest_lib.read_manifest(str(out))


def _records(out, manifest):
    dim = manifest.backbone.embedding_dim
    by_split = {}
    for split in csv_format.SPLITS:
        pattern = os.path.join(out, features.tfrecord_pattern(split))
        by_split[split] = [
            {k: v.numpy() for k, v in r.items()} for r in features.read_dataset(pattern, dim)
        ]
    return by_split


@pytest.fixture(scope="module")
def first_run(dataset, tiny_backbone, tmp_path_factory):
    _, csv_path = dataset
    out = tmp_path_factory.mktemp("out1")
    result, manifest = _run(csv_path, out, tiny_backbone)
    return out, result, manifest


def test_counts_add_up(first_run):
    out, result, manifest = first_run
    rows = manifest.rows
    # 36 good + 9 extra data rows (the blank line is not a row).
    assert rows.read == 45
    assert rows.duplicates == 2
    # truncated, empty, text, missing, the two conflicting rows, the one-column row.
    assert rows.rejected == 7
    assert rows.written == 36 - 1 + 1  # rose_1 lost to the conflict, rgba.png added
    assert rows.read == rows.written + rows.duplicates + rows.rejected
    assert manifest.rejected_by_reason == {
        "undecodable": 2,
        "empty_file": 1,
        "unreadable": 1,
        "conflicting_labels": 2,
        "bad_row": 1,
    }
    counters = {
        c.key.metric.name: c.committed
        for c in result.metrics().query()["counters"]
        if c.key.metric.namespace == "hubflow"
    }
    assert counters["rows_read"] == 45
    assert counters["rows_written"] == 36
    assert counters["rows_duplicate"] == 2
    assert counters["rows_rejected_conflicting_labels"] == 2


def test_manifest_describes_the_dataset(first_run, tiny_backbone):
    out, _, manifest = first_run
    assert manifest.labels == sorted(CLASS_COLOURS)  # alphabetical vocabulary
    assert (out / "labels.txt").read_text().split() == manifest.labels
    assert manifest.backbone.handle == tiny_backbone
    assert manifest.backbone.image_size == 32 and manifest.backbone.embedding_dim == 16
    assert sum(manifest.split_count(s) for s in csv_format.SPLITS) == manifest.rows.written
    for split in csv_format.SPLITS:
        assert sum(manifest.splits[split]["labels"].values()) == manifest.split_count(split)
    raw = json.loads((out / "manifest.json").read_text())
    for key in ("schema_version", "options", "versions", "created"):
        assert raw[key]
    assert raw["versions"]["apache-beam"].startswith("2.")
    assert raw["options"]["batch_size"] == 8


def test_records_match_sources_and_backbone(first_run, dataset):
    out, _, manifest = first_run
    root, _ = dataset
    records = _records(str(out), manifest)
    assert {s: len(r) for s, r in records.items()} == {
        s: manifest.split_count(s) for s in csv_format.SPLITS
    }
    all_records = [r for split in records.values() for r in split]
    model = hub.load(manifest.backbone)
    sources = set()
    for r in all_records:
        source = r[features.IMAGE_SOURCE].decode()
        assert os.path.isabs(source)
        sources.add(source)
        label_text = r[features.LABEL_TEXT].decode()
        assert manifest.labels[r[features.LABEL]] == label_text
        original = open(source, "rb").read()
        assert r[features.IMAGE_SHA256].decode() == hashlib.sha256(original).hexdigest()
        assert r[features.IMAGE_FORMAT] == features.IMAGE_FORMAT_JPEG
        decoded = tf.io.decode_jpeg(r[features.IMAGE_ENCODED]).numpy()
        assert decoded.shape[:2] == (r[features.IMAGE_HEIGHT], r[features.IMAGE_WIDTH])
        expected = model(
            decode_to_backbone_input(tf.constant([r[features.IMAGE_ENCODED]]), 32)
        ).numpy()[0]
        stored = r[features.EMBEDDING]
        cosine = stored @ expected / (np.linalg.norm(stored) * np.linalg.norm(expected))
        assert cosine >= 0.98
    assert len(sources) == len(all_records)  # each content written once
    assert str(root / "rose" / "rose_1.jpg") not in sources  # lost to the conflict
    assert str(root / "bad" / "copy_of_daisy_0.jpg") not in sources  # kept the first copy
    # the RGBA PNG was flattened onto white and stored as an RGB JPEG
    rgba = [r for r in all_records if r[features.IMAGE_SOURCE].decode().endswith("rgba.png")]
    assert tf.io.decode_jpeg(rgba[0][features.IMAGE_ENCODED]).shape[-1] == 3


def test_error_records_name_source_line_and_reason(first_run, dataset):
    out, _, manifest = first_run
    _, csv_path = dataset
    errors = []
    for path in glob.glob(str(out / "errors-*.jsonl")):
        errors += [json.loads(line) for line in open(path) if line.strip()]
    assert len(errors) == manifest.rows.rejected
    by_uri = {os.path.basename(e["uri"]): e for e in errors if e["uri"]}
    for e in errors:
        assert set(ERROR_FIELDS) <= set(e)
        assert e["stage"] in STAGES and e["category"] in CATEGORIES  # the documented words
        assert e["csv"] == str(csv_path)
        assert e["reason"]
    # header is line 1, 36 good rows, blank line 38 -> truncated.jpg is line 39
    assert by_uri["truncated.jpg"]["line"] == 39
    assert by_uri["truncated.jpg"]["stage"] == "decode"
    assert by_uri["missing.jpg"]["category"] == "unreadable"
    assert by_uri["missing.jpg"]["row"] == "bad/missing.jpg,tulip"
    assert "rose" in by_uri["rose_lookalike.jpg"]["reason"]
    assert "tulip" in by_uri["rose_1.jpg"]["reason"]
    bad_row = [e for e in errors if e["category"] == "bad_row"][0]
    assert bad_row["row"] == "only-one-column" and bad_row["line"] == 46


def test_transform_fn_normalises_embeddings(first_run):
    import tensorflow_transform as tft

    out, _, manifest = first_run
    records = _records(str(out), manifest)
    embeddings = np.stack([r[features.EMBEDDING] for s in records.values() for r in s])
    tft_output = tft.TFTransformOutput(str(out))
    transformed = tft_output.transform_raw_features(
        {features.EMBEDDING: tf.constant(embeddings)}, drop_unused_features=True
    )[features.EMBEDDING].numpy()
    np.testing.assert_allclose(transformed.mean(axis=0), 0.0, atol=1e-3)
    varying = embeddings.std(axis=0) > 1e-6
    np.testing.assert_allclose(transformed.std(axis=0)[varying], 1.0, atol=1e-2)


def test_rerun_multiprocess_gives_identical_splits(first_run, dataset, tiny_backbone, tmp_path):
    out1, _, manifest1 = first_run
    _, csv_path = dataset
    _, manifest2 = _run(
        csv_path,
        tmp_path,
        tiny_backbone,
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=2",
    )
    assert manifest2.splits == manifest1.splits
    assert manifest2.rows == manifest1.rows

    def split_of(out, manifest):
        return {
            r[features.IMAGE_SHA256]: split
            for split, rs in _records(str(out), manifest).items()
            for r in rs
        }

    assert split_of(tmp_path, manifest2) == split_of(out1, manifest1)


def test_label_dict_order_and_unknown_labels(dataset, tiny_backbone, tmp_path):
    root, _ = dataset
    csv_path = root / "split.csv"
    rows = ["label,image_uri,split"]
    rows += [f"rose,rose/rose_{i}.jpg,{'test' if i < 3 else ''}" for i in range(6)]
    rows += [f"daisy,daisy/daisy_{i}.jpg,eval" for i in range(4)]
    rows += ["tulip,tulip/tulip_0.jpg,"]
    csv_path.write_text("\n".join(rows) + "\n")
    label_dict = tmp_path / "labels.txt"
    label_dict.write_text("rose\ndaisy\n")
    out = tmp_path / "out"
    _, manifest = _run(csv_path, out, tiny_backbone, f"--label_dict={label_dict}")
    assert manifest.labels == ["rose", "daisy"]
    assert manifest.rejected_by_reason == {"unknown_label": 1}
    assert manifest.splits["eval"]["labels"]["daisy"] == 4  # the split column wins
    assert manifest.splits["test"]["labels"]["rose"] >= 3
    records = _records(str(out), manifest)
    assert all(r[features.LABEL] == 1 for r in records["eval"])  # index from the dict order


def test_image_dir_input(tiny_backbone, tmp_path):
    image_dir = tmp_path / "dir"
    write_dataset(image_dir, per_class=3)
    out = tmp_path / "out"
    argv = [f"--image_dir={image_dir}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert preprocess.main(argv) == 0
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.labels == sorted(CLASS_COLOURS)
    assert manifest.rows.written == 9 and manifest.rows.read == 9


def test_no_usable_row_exits_nonzero(tmp_path, tiny_backbone, capsys):
    csv_path = tmp_path / "bad.csv"
    (tmp_path / "x.jpg").write_bytes(b"nope")
    csv_path.write_text("x.jpg,a\nmissing.jpg,b\n")
    code = preprocess.main(
        [
            f"--input_csv={csv_path}",
            f"--output_dir={tmp_path / 'out'}",
            f"--backbone={tiny_backbone}",
        ]
    )
    assert code == 1
    manifest = manifest_lib.read_manifest(str(tmp_path / "out"))
    assert manifest.rows.read == 2 and manifest.rows.rejected == 2
    assert "no row was usable" in capsys.readouterr().err
