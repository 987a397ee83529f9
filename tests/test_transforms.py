"""DoFn-level tests of the pipeline's row handling, with TestPipeline and the dead-letter outputs."""

from __future__ import annotations

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import transforms
from pipeline.records import ERRORS, SOURCE_CSV, Row
from schemas import csv_format
from schemas.errors import ErrorRecord


def _row(line, label, uri="/img/a.jpg", split=None, source="/d/labels.csv"):
    return Row(source, line, f"{uri},{label}", uri, label, split)


def test_assign_split_is_deterministic_and_proportional():
    import hashlib

    hashes = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(20000)]
    splits = [transforms.assign_split(h, 0.1, 0.2) for h in hashes]
    assert splits == [transforms.assign_split(h, 0.1, 0.2) for h in hashes]
    assert abs(splits.count(csv_format.TEST) / 20000 - 0.2) < 0.015
    assert abs(splits.count(csv_format.EVAL) / 20000 - 0.1) < 0.015
    assert set(transforms.assign_split(h, 0.0, 0.0) for h in hashes[:100]) == {csv_format.TRAIN}


def test_duplicates_keep_first_row_and_count_the_rest():
    sha = "0" * 64  # bucket 0.0 -> test split
    rows = [_row(7, "rose", "/img/b.jpg"), _row(3, "rose", "/img/a.jpg")]
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(sha, rows)])
            | beam.ParDo(transforms.ResolveDuplicatesFn(0.1, 0.1)).with_outputs(
                ERRORS, transforms.DUPLICATES, main="accepted"
            )
        )
        assert_that(
            out.accepted,
            equal_to([transforms.Accepted(sha, rows[1], csv_format.TEST)]),
            label="accepted",
        )
        assert_that(out[transforms.DUPLICATES], equal_to([rows[0]]), label="dupes")
        assert_that(out[ERRORS], equal_to([]), label="errors")


def test_split_column_overrides_hash():
    sha = "0" * 64
    rows = [_row(3, "rose"), _row(4, "rose", "/img/b.jpg", split=csv_format.TRAIN)]
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(sha, rows)])
            | beam.ParDo(transforms.ResolveDuplicatesFn(0.1, 0.1)).with_outputs(
                ERRORS, transforms.DUPLICATES, main="accepted"
            )
        )
        assert_that(out.accepted | beam.Map(lambda a: a.split), equal_to([csv_format.TRAIN]))


def test_conflicting_labels_reject_every_row_and_name_the_others():
    sha = "f" * 64
    rows = [_row(2, "rose"), _row(5, "tulip", "/img/b.jpg"), _row(9, "rose", "/img/c.jpg")]
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(sha, rows)])
            | beam.ParDo(transforms.ResolveDuplicatesFn(0.1, 0.1)).with_outputs(
                ERRORS, transforms.DUPLICATES, main="accepted"
            )
        )
        assert_that(out.accepted, equal_to([]), label="none accepted")
        assert_that(out[transforms.DUPLICATES], equal_to([]), label="no dupes")

        def check(errors):
            assert sorted(e.line for e in errors) == [2, 5, 9]
            for e in errors:
                assert e.category == "conflicting_labels" and e.stage == "dedupe"
                other = "tulip" if e.row.endswith("rose") else "rose"
                assert f"'{other}'" in e.reason

        assert_that(out[ERRORS], check, label="errors")


def test_parse_rows_rejects_labels_outside_label_dict(tmp_path):
    csv_path = tmp_path / "l.csv"
    csv_path.write_text("a.jpg,rose\nb.jpg,weed\n,rose\n")
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(SOURCE_CSV, str(csv_path))])
            | beam.ParDo(transforms.ParseRowsFn(["rose", "tulip"])).with_outputs(
                ERRORS, main="rows"
            )
        )
        assert_that(out.rows | beam.Map(lambda r: (r.line, r.label)), equal_to([(1, "rose")]))
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.line, e.category)),
            equal_to([(2, "unknown_label"), (3, "bad_row")]),
            label="errors",
        )


def test_hash_and_validate_dead_letters_unreadable_and_broken_images(tmp_path):
    from tests.conftest import photo

    good = tmp_path / "good.png"
    good.write_bytes(photo((10, 200, 10), fmt="PNG"))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photo((10, 200, 10))[:200])
    rows = [
        _row(1, "x", str(good)),
        _row(2, "x", str(broken)),
        _row(3, "x", str(tmp_path / "missing.jpg")),
    ]
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create(rows)
            | beam.ParDo(transforms.HashAndValidateFn(10_000)).with_outputs(ERRORS, main="ok")
        )
        assert_that(out.ok | beam.Map(lambda kv: kv[1].line), equal_to([1]))
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.line, e.stage, e.category)),
            equal_to([(2, "decode", "undecodable"), (3, "read", "unreadable")]),
            label="errors",
        )


@pytest.mark.parametrize("limit, ok", [(48 * 40, True), (48 * 40 - 1, False)])
def test_hash_and_validate_pixel_limit(tmp_path, limit, ok):
    from tests.conftest import photo

    path = tmp_path / "p.jpg"
    path.write_bytes(photo((1, 2, 3), size=(48, 40)))
    result = transforms.hash_and_validate(_row(1, "x", str(path)), limit)
    assert (not isinstance(result, ErrorRecord)) == ok
    if not ok:
        assert result.category == "too_large" and result.stage == "decode"
