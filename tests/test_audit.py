"""hubflow-audit on generated data dirs: planted label flips, near-copies and unlabeled images.

The data dirs are written directly (``schemas.features.make_example`` + a manifest), with
embeddings drawn around one centre per class, so a test runs in seconds and knows the truth:
which labels were flipped, which records are copies of which, which images are ambiguous.
"""

from __future__ import annotations

import csv
import hashlib
import html
import io
import json
import logging
import os
import re
import urllib.parse

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from evaluation import plots
from schemas import csv_format, features
from schemas import manifest as manifest_lib
from schemas.backbones import BackboneSpec
from training import audit, audit_curve, audit_duplicates, sampling

LABELS = ["ant", "bee", "wasp"]
DIM = 64
PER_SPLIT = {csv_format.TRAIN: 40, csv_format.EVAL: 10, csv_format.TEST: 10}  # per class
FLIPPED = 6  # train rows whose label is changed
LEAKED = 3  # test records copied (with a little noise) into train
BUDGET = 4


def _jpeg(colour) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), tuple(int(c) for c in colour)).save(buffer, "JPEG")
    return buffer.getvalue()


class Builder:
    """Records of a data dir being built; :meth:`write` writes the shards and the manifest."""

    def __init__(self, seed: int = 0):
        self.seed = seed
        self.rng = np.random.default_rng(seed)
        self.centres = self.rng.normal(0.0, 1.5, (len(LABELS), DIM))
        self.records: list[dict] = []

    def add(self, split, label, embedding, name=None) -> dict:
        index = len(self.records)
        uri = f"/images/{self.seed}/{name or f'{split}_{index}'}.jpg"
        record = {
            "split": split,
            "label": label,
            "embedding": np.asarray(embedding, np.float32),
            "uri": uri,
            "sha256": hashlib.sha256(uri.encode()).hexdigest(),
        }
        self.records.append(record)
        return record

    def sample(self, label) -> np.ndarray:
        return self.centres[label] + self.rng.normal(0.0, 1.0, DIM)

    def write(self, path, backbone: str = "standin") -> str:
        path = str(path)
        os.makedirs(path, exist_ok=True)
        splits = manifest_lib.empty_splits(LABELS)
        for split in csv_format.ALL_SPLITS:
            members = [r for r in self.records if r["split"] == split]
            if not members:
                continue
            shard = os.path.join(path, f"{split}-00000-of-00001{features.TFRECORD_SUFFIX}")
            with tf.io.TFRecordWriter(shard) as writer:
                for r in members:
                    label = r["label"]
                    text = LABELS[label] if label >= 0 else ""
                    example = features.make_example(
                        jpeg=_jpeg(self.rng.integers(0, 255, 3)),
                        height=16,
                        width=24,
                        source=r["uri"],
                        sha256=r["sha256"],
                        label=label,
                        label_text=text,
                        embedding=r["embedding"],
                    )
                    writer.write(example.SerializeToString())
                    splits[split]["count"] += 1
                    if text:
                        splits[split]["labels"][text] += 1
        n = len(self.records)
        manifest = manifest_lib.Manifest(
            labels=LABELS,
            backbone=BackboneSpec(backbone, f"/models/{backbone}", 32, DIM),
            splits=splits,
            rows=manifest_lib.RowCounts(read=n + 2, written=n, rejected=2),
            rejected_by_reason={"undecodable": 2},
            options={},
            versions={},
            created="2026-01-01T00:00:00+00:00",
        )
        with open(manifest_lib.manifest_path(path), "w") as f:
            json.dump(manifest.to_json(), f)
        return path


def planted(seed: int = 0, unlabeled: bool = True) -> tuple[Builder, dict]:
    """Clean classes, plus flipped train labels, test photos leaked into train, a near-copy pair
    inside train, and (optionally) unlabeled images: some clear, a tight ambiguous cluster."""
    b = Builder(seed)
    truth: dict = {"flipped": set(), "leaked": [], "inside": None, "ambiguous": set()}
    for split, per_class in PER_SPLIT.items():
        for label in range(len(LABELS)):
            for _ in range(per_class):
                b.add(split, label, b.sample(label))
    train = [r for r in b.records if r["split"] == csv_format.TRAIN]
    for r in b.rng.choice(train, FLIPPED, replace=False):
        r["label"] = (r["label"] + 1) % len(LABELS)
        truth["flipped"].add(r["uri"])
    for r in b.rng.choice([r for r in b.records if r["split"] == csv_format.TEST], LEAKED, False):
        copy = b.add(csv_format.TRAIN, r["label"], r["embedding"] + b.rng.normal(0, 0.05, DIM))
        truth["leaked"].append((copy["uri"], r["uri"]))
    source = train[-1]  # a near-copy closer than any leaked one, inside train
    twin = b.add(csv_format.TRAIN, source["label"], source["embedding"] + 0.01)
    truth["inside"] = (source["uri"], twin["uri"])
    if unlabeled:
        for label in range(len(LABELS)):
            for _ in range(4):
                b.add(csv_format.UNLABELED, features.UNLABELED_INDEX, b.sample(label))
        middle = (b.centres[0] + b.centres[1]) / 2
        for _ in range(5):  # nearly one image, halfway between two classes
            r = b.add(
                csv_format.UNLABELED, features.UNLABELED_INDEX, middle + b.rng.normal(0, 0.02, DIM)
            )
            truth["ambiguous"].add(r["uri"])
    return b, truth


def read_csv(path, header=True) -> list[dict] | list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f)) if header else list(csv.reader(f))


def run_audit(data_dir, output_dir, *flags) -> dict:
    return audit.run(
        audit.parse_config([f"--data_dir={data_dir}", f"--output_dir={output_dir}", *flags])
    )


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    builder, truth = planted()
    data_dir = builder.write(root / "data")
    output_dir = str(root / "audit")
    result = run_audit(data_dir, output_dir, f"--budget={BUDGET}")
    return {"data_dir": data_dir, "out": output_dir, "audit": result, "truth": truth, "b": builder}


def test_label_issues_columns_order_and_planted_flips_first(audited):
    rows = read_csv(os.path.join(audited["out"], audit.LABEL_ISSUES_CSV))
    with open(os.path.join(audited["out"], audit.LABEL_ISSUES_CSV)) as f:
        assert f.readline().strip() == "uri,split,given_label,suggested_label,score"
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    flipped = audited["truth"]["flipped"]
    top = {r["uri"] for r in rows[: 2 * len(flipped)]}
    assert len(top & flipped) >= 5  # of 6
    original = {r["uri"]: LABELS[(r["label"] - 1) % 3] for r in audited["b"].records}
    for r in rows:
        assert r["split"] in (csv_format.TRAIN, csv_format.EVAL)
        if r["uri"] in flipped:
            assert r["suggested_label"] == original[r["uri"]] != r["given_label"]
    assert audited["audit"]["label_issues"]["flagged"] == len(rows)
    assert audited["audit"]["label_issues"]["checked"] == sum(
        1 for r in audited["b"].records if r["split"] in (csv_format.TRAIN, csv_format.EVAL)
    )


def test_near_duplicates_report_leakage_first(audited):
    path = os.path.join(audited["out"], audit.NEAR_DUPLICATES_CSV)
    with open(path) as f:
        assert f.readline().strip() == "uri_a,uri_b,split_a,split_b,cosine"
    rows = read_csv(path)
    pairs = [frozenset((r["uri_a"], r["uri_b"])) for r in rows]
    leaked = [frozenset(p) for p in audited["truth"]["leaked"]]
    inside = frozenset(audited["truth"]["inside"])
    assert set(leaked) <= set(pairs) and inside in pairs
    leakage = [
        r["split_a"] != r["split_b"] and {r["split_a"], r["split_b"]} <= set(csv_format.SPLITS)
        for r in rows
    ]
    assert leakage == sorted(leakage, reverse=True)  # every leakage pair before the others
    inside_row = rows[pairs.index(inside)]
    assert float(inside_row["cosine"]) > max(float(rows[pairs.index(p)]["cosine"]) for p in leaked)
    for group in (True, False):
        cosines = [
            float(r["cosine"]) for r, leak in zip(rows, leakage, strict=True) if leak == group
        ]
        assert cosines == sorted(cosines, reverse=True)
    for r, leak in zip(rows, leakage, strict=True):
        if leak:  # the train side comes first
            assert (r["split_a"], r["split_b"]) == (csv_format.TRAIN, csv_format.TEST)
    section = audited["audit"]["near_duplicates"]
    assert section["leakage"] == sum(leakage) == LEAKED
    assert section["pairs"] == len(rows)


def test_find_in_blocks_equals_the_full_matrix():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(50, 8))
    x[10] = x[3] + 0.01
    x[49] = x[0] + 0.02
    unit = audit_duplicates.unit_rows(x, None)
    full = unit @ unit.T
    expected = {(a, b) for a, b in zip(*np.nonzero(full >= 0.8), strict=True) if a < b}
    pairs = audit_duplicates.find(unit, 0.8, block_rows=7)
    assert set(zip(pairs.a.tolist(), pairs.b.tolist(), strict=True)) == expected
    assert {(3, 10), (0, 49)} <= expected
    np.testing.assert_allclose(pairs.cosine, full[pairs.a, pairs.b], rtol=1e-5)


def test_to_label_respects_the_budget_and_spreads_over_the_ambiguous_cluster(audited):
    rows = read_csv(os.path.join(audited["out"], audit.TO_LABEL_CSV))
    assert list(rows[0]) == ["uri", "predicted_label", "score", "margin"]
    assert len(rows) == BUDGET
    unlabeled = {r["uri"] for r in audited["b"].records if r["split"] == csv_format.UNLABELED}
    assert {r["uri"] for r in rows} <= unlabeled
    ambiguous = audited["truth"]["ambiguous"]
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert rows[0]["uri"] in ambiguous  # the most uncertain comes first
    assert sum(r["uri"] in ambiguous for r in rows) == 1  # its near-copies are not picked again
    assert all(r["predicted_label"] in LABELS for r in rows)
    assert float(rows[0]["score"]) == pytest.approx(1 - float(rows[0]["margin"]), abs=2e-4)
    appendable = read_csv(os.path.join(audited["out"], audit.TO_LABEL_ROWS_CSV), header=False)
    assert appendable == [[r["uri"], r["predicted_label"]] for r in rows]
    section = audited["audit"]["to_label"]
    assert section["budget"] == BUDGET and section["unlabeled"] == len(unlabeled)


def test_audit_json_holds_what_the_page_needs(audited):
    out, result = audited["out"], audited["audit"]
    with open(os.path.join(out, audit.AUDIT_JSON)) as f:
        assert json.load(f) == json.loads(json.dumps(result))
    for key in (
        "data_dir", "created", "backbone", "labels", "counts", "rows", "rejected_by_reason",
        "label_issues", "near_duplicates", "learning_curve", "confusion", "to_label", "files",
        "seconds",
    ):  # fmt: skip
        assert key in result
    records = audited["b"].records
    assert result["counts"][csv_format.UNLABELED]["count"] == sum(
        r["split"] == csv_format.UNLABELED for r in records
    )
    assert result["rejected_by_reason"] == {"undecodable": 2}
    confusion = result["confusion"]
    test = [r for r in records if r["split"] == csv_format.TEST]
    assert confusion["split"] == csv_format.TEST
    assert np.sum(confusion["matrix"]) == len(test)
    in_cells = [item["uri"] for cell in confusion["cells"].values() for item in cell]
    assert sorted(in_cells) == sorted(r["uri"] for r in test)
    for key, cell in confusion["cells"].items():
        true, predicted = key.split(",")
        assert len(cell) == confusion["matrix"][LABELS.index(true)][LABELS.index(predicted)]
    thumbs = [item["thumb"] for cell in confusion["cells"].values() for item in cell]
    thumbs += [r["thumb"] for r in result["label_issues"]["rows"] + result["to_label"]["rows"]]
    thumbs += [r[k] for r in result["near_duplicates"]["rows"] for k in ("thumb_a", "thumb_b")]
    for thumb in thumbs:
        with Image.open(os.path.join(out, thumb)) as image:
            assert image.format == "JPEG" and max(image.size) <= 160
    for name in result["files"].values():
        assert os.path.exists(os.path.join(out, name))
    assert result["learning_curve"]["png"] == audit.CURVE_PNG
    with open(os.path.join(out, audit.CURVE_PNG), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, result["files"]["report"]), encoding="utf-8") as f:
        sources = re.findall(r'<img[^>]* src="([^"]+)"', f.read())
    assert len(sources) > len(thumbs) / 2  # the page shows the images, from files that exist
    for source in sources:
        assert os.path.isfile(os.path.join(out, urllib.parse.unquote(html.unescape(source))))


def test_learning_curve_is_reproducible_by_seed_and_drawn_like_the_trainer():
    rng = np.random.default_rng(5)  # overlapping classes: accuracy depends on the draw
    centres = rng.normal(0.0, 0.35, (len(LABELS), DIM))
    y_train, y_test = np.repeat([0, 1, 2], 45), np.repeat([0, 1, 2], 30)
    y_train[:3] = 1  # classes of unequal size: 48, 42, 45
    x_train = centres[y_train] + rng.normal(0.0, 1.0, (len(y_train), DIM))
    x_test = centres[y_test] + rng.normal(0.0, 1.0, (len(y_test), DIM))
    args = (x_train, y_train, x_test, y_test, len(LABELS))
    first = audit_curve.learning_curve(*args, draws=3, seed=7)
    assert first == audit_curve.learning_curve(*args, draws=3, seed=7)
    other = audit_curve.learning_curve(*args, draws=3, seed=8)
    assert [p["accuracies"] for p in first] != [p["accuracies"] for p in other]
    assert [p["k"] for p in first] == [1, 2, 5, 10, 20, 48]
    for point in first[:-1]:
        assert point["seeds"] == [7, 8, 9]
        drawn = sampling.per_class_indices(y_train, point["k"], 7, strict=False)
        assert point["examples"] == len(drawn)
        assert point["min"] <= point["mean"] <= point["max"]
    assert first[-1]["seeds"] == [7] and first[-1]["examples"] == len(y_train)
    assert first[0]["mean"] < first[-1]["mean"]


@pytest.mark.parametrize(
    "means, expected",
    [
        ([0.5, 0.6, 0.7, 0.8, 0.9], "still rising"),
        ([0.5, 0.85, 0.895, 0.905, 0.9], "flat beyond 5 per class"),
    ],
)
def test_curve_reading(means, expected):
    points = [{"k": k, "mean": m} for k, m in zip([1, 2, 5, 10, 40], means, strict=True)]
    assert expected in audit_curve.reading(points)


def test_learning_curve_png():
    points = [
        {"k": 1, "mean": 0.6, "std": 0.1, "accuracies": [0.5, 0.7]},
        {"k": 10, "mean": 0.9, "std": 0.0, "accuracies": [0.9]},
    ]
    assert plots.learning_curve_png(points, "rising").startswith(b"\x89PNG")


def _refused(capsys, *argv) -> str:
    capsys.readouterr()
    assert audit.main(list(argv)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("hubflow-audit: error: ")
    return err[0]


def test_misuse_is_refused_in_one_line(tmp_path, capsys):
    data_dir = planted(unlabeled=False)[0].write(tmp_path / "data")
    out = str(tmp_path / "out")
    assert "--data_dir is required" in _refused(capsys, f"--output_dir={out}")
    assert "--output_dir is required" in _refused(capsys, f"--data_dir={data_dir}")
    assert "does not exist" in _refused(
        capsys, f"--data_dir={tmp_path}/nope", f"--output_dir={out}"
    )
    (tmp_path / "empty").mkdir()
    assert "not found" in _refused(
        capsys, f"--data_dir={tmp_path / 'empty'}", f"--output_dir={out}"
    )
    for inside in (data_dir, os.path.join(data_dir, "audit")):
        assert "inside --data_dir" in _refused(
            capsys, f"--data_dir={data_dir}", f"--output_dir={inside}"
        )
    for flag in ("--folds=1", "--duplicate_threshold=1.5", "--budget=0", "--draws=x"):
        assert flag.split("=")[0] in _refused(
            capsys, f"--data_dir={data_dir}", f"--output_dir={out}", flag
        )
    assert not os.path.exists(out)
    other = planted(unlabeled=False)[0].write(tmp_path / "other")
    message = _refused(capsys, f"--data_dir={data_dir}", f"--output_dir={other}")
    assert "holds a hubflow dataset" in message
    assert sorted(os.listdir(other)) == sorted([*os.listdir(data_dir), ".hubflow.lock"])


def test_shards_that_do_not_match_the_manifest_are_refused(tmp_path, capsys):
    data_dir = planted(unlabeled=False)[0].write(tmp_path / "data")
    os.remove(os.path.join(data_dir, f"eval-00000-of-00001{features.TFRECORD_SUFFIX}"))
    message = _refused(capsys, f"--data_dir={data_dir}", f"--output_dir={tmp_path / 'out'}")
    assert "the eval split holds 0 records but manifest.json counts 30" in message


def test_rerun_replaces_only_the_audit_outputs(tmp_path, capsys):
    with_unlabeled = planted(seed=1)[0].write(tmp_path / "a")
    without = planted(seed=2, unlabeled=False)[0].write(tmp_path / "b")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    first = run_audit(with_unlabeled, out)
    assert (out / audit.TO_LABEL_CSV).exists()
    old_thumbs = set(os.listdir(out / audit.THUMBS_DIR))
    # A refused run leaves the previous audit as it was.
    _refused(capsys, f"--data_dir={tmp_path / 'missing'}", f"--output_dir={out}")
    assert json.loads((out / audit.AUDIT_JSON).read_text()) == json.loads(json.dumps(first))
    capsys.readouterr()
    assert audit.main([f"--data_dir={without}", f"--output_dir={out}"]) == 0
    printed = capsys.readouterr().out
    assert "no unlabeled images" in printed and "leakage across splits" in printed
    second = json.loads((out / audit.AUDIT_JSON).read_text())
    assert second["data_dir"] == without and second["to_label"]["rows"] == []
    assert not (out / audit.TO_LABEL_CSV).exists() and not (out / audit.TO_LABEL_ROWS_CSV).exists()
    assert (out / "notes.txt").read_text() == "mine"
    assert not old_thumbs & set(os.listdir(out / audit.THUMBS_DIR))  # other images now
    assert sorted(p for p in os.listdir(out) if not p.startswith(".")) == sorted(
        ["notes.txt", *second["files"].values(), audit.THUMBS_DIR, audit.AUDIT_JSON]
    )


@pytest.mark.parametrize(
    "backbone, flags, threshold, source",
    [
        ("efficientnet_lite2", [], 0.80, audit_duplicates.CALIBRATED),
        ("my_own_model", [], audit_duplicates.DEFAULT_THRESHOLD, audit_duplicates.UNCALIBRATED),
        ("efficientnet_lite0", ["--duplicate_threshold=0.99"], 0.99, "--duplicate_threshold"),
    ],
)
def test_the_duplicate_threshold_follows_the_backbone_and_says_where_it_came_from(
    tmp_path, caplog, backbone, flags, threshold, source
):
    builder, truth = planted(seed=3, unlabeled=False)
    data_dir = builder.write(tmp_path / "data", backbone=backbone)
    with caplog.at_level(logging.WARNING, logger="training.audit"):
        result = run_audit(data_dir, str(tmp_path / "audit"), *flags)
    section = result["near_duplicates"]
    assert (section["threshold"], section["threshold_source"]) == (threshold, source)
    warned = [r for r in caplog.records if "no threshold was calibrated" in r.getMessage()]
    assert len(warned) == (source == audit_duplicates.UNCALIBRATED)
    if warned:
        assert backbone in warned[0].getMessage()
    pairs = {frozenset((r["uri_a"], r["uri_b"])) for r in section["rows"]}
    # the planted copy inside train (cosine ~1) is found at any of these thresholds
    assert frozenset(truth["inside"]) in pairs
