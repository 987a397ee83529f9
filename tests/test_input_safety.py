"""Odd input never crashes, hangs or silently shrinks a job (issue 11, items 7-11).

Labels with line breaks, FIFOs and device files, oversized files, unreadable class folders and
all-rejected datasets: each becomes error records with a reason, and the row counts add up.
"""

from __future__ import annotations

import glob
import io
import json
import os
import stat

import apache_beam as beam
import pytest
from apache_beam.io.filesystem import FileMetadata
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipeline import csv_rows, files, images, preprocess, scoring, transforms
from pipeline.records import ERRORS, SOURCE_IMAGE_DIR, Row
from schemas import errors
from schemas import manifest as manifest_lib
from schemas.errors import ErrorRecord
from tests.conftest import CLASS_COLOURS, photo, write_dataset

MAX_PIXELS = 10_000


def _row(uri, label="rose", line=1):
    return Row("/d/labels.csv", line, f"{uri},{label}", str(uri), label, None)


def _errors(out) -> list[dict]:
    found = []
    for path in glob.glob(os.path.join(out, "errors-*.jsonl")):
        found += [json.loads(line) for line in open(path) if line.strip()]
    return found


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.jpg"
    os.mkfifo(path)
    return path


def _spy_reads(monkeypatch) -> list[int]:
    """Records the size of every ``os.read`` call (what a local image read asks for)."""
    sizes: list[int] = []
    real_read = os.read

    def read(fd, n):
        sizes.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(os, "read", read)
    return sizes


# --- 7. labels with line breaks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "label, what, next_line",
    [
        ('"multi\nline"', "line break (U+000A)", 3),
        ('"multi\r\nline"', "line break (U+000D)", 3),
        ('"multi\rline"', "line break (U+000D)", 3),
        ("multi\u2028line", "line break (U+2028)", 2),
        ("multi\x85line", "line break (U+0085)", 2),
        ("multi\x0bline", "line break (U+000B)", 2),
        ("tab\tseparated", "control character (U+0009)", 2),
        ("nul\x00byte", "control character (U+0000)", 2),
    ],
)
def test_label_with_a_line_break_or_control_character_is_a_bad_row(label, what, next_line):
    records = list(csv_rows.parse_csv("/d/labels.csv", f"a.jpg,{label}\nb.jpg,rose\n"))
    error, row = records
    assert isinstance(error, ErrorRecord), error
    assert (error.line, error.uri, error.stage) == (1, "/d/a.jpg", errors.STAGE_PARSE)
    assert error.category == errors.BAD_ROW
    assert what in error.reason and "labels.txt" in error.reason
    assert row == Row("/d/labels.csv", next_line, "b.jpg,rose", "/d/b.jpg", "rose")


def test_printable_unicode_labels_are_kept():
    labels = ["rosa canina", "Gänseblümchen", "蒲公英", "family: 👩\u200d👩\u200d👧"]
    text = "".join(f"{i}.jpg,{label}\n" for i, label in enumerate(labels))
    assert [r.label for r in csv_rows.parse_csv("/d/l.csv", text)] == labels
    assert all(csv_rows.label_problem(label) is None for label in labels)


def test_class_folder_with_a_line_break_is_a_bad_row(tmp_path):
    for label in ("rose", "multi\nline"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.jpg").write_bytes(b"x")
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(SOURCE_IMAGE_DIR, str(tmp_path))])
            | beam.ParDo(transforms.ParseRowsFn()).with_outputs(ERRORS, main="rows")
        )
        assert_that(out.rows | beam.Map(lambda r: r.label), equal_to(["rose"]))
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.row, e.category, "line break" in e.reason)),
            equal_to([("multi\nline/a.jpg", errors.BAD_ROW, True)]),
            label="errors",
        )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_job_with_a_multiline_label_and_special_files_finishes_and_counts_them(
    tmp_path, tiny_backbone
):
    root = tmp_path / "images"
    paths = write_dataset(root, per_class=3)
    (root / "extra1.jpg").write_bytes(photo(CLASS_COLOURS["rose"], seed=991))
    (root / "extra2.jpg").write_bytes(photo(CLASS_COLOURS["rose"], seed=992))
    os.mkfifo(root / "pipe.jpg")
    lines = ["image_uri,label"] + [f"{p},{label}" for label, ps in paths.items() for p in ps]
    lines += ['"extra1.jpg","multi\nline"', '"extra2.jpg","carriage\rreturn"']
    lines += ["pipe.jpg,rose", "/dev/zero,rose"]  # a FIFO and a device file
    csv_path = root / "labels.csv"
    csv_path.write_text("\n".join(lines) + "\n", newline="")
    out = str(tmp_path / "out")
    argv = [f"--input_csv={csv_path}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert preprocess.main(argv) == 0

    manifest = manifest_lib.read_manifest(out)
    rows = manifest.rows
    assert (rows.read, rows.written, rows.duplicates, rows.rejected) == (13, 9, 0, 4)
    assert manifest.labels == sorted(CLASS_COLOURS)
    assert (tmp_path / "out" / "labels.txt").read_text().splitlines() == manifest.labels
    assert manifest.rejected_by_reason == {errors.BAD_ROW: 2, errors.UNREADABLE: 2}
    found = {e["line"]: e for e in _errors(out)}
    bad_row, unreadable = (
        (errors.STAGE_PARSE, errors.BAD_ROW),
        (errors.STAGE_READ, errors.UNREADABLE),
    )
    expected = {11: bad_row, 13: bad_row, 15: unreadable, 16: unreadable}
    assert {line: (e["stage"], e["category"]) for line, e in found.items()} == expected
    assert found[11]["row"] == '"extra1.jpg","multi\nline"' and "line break" in found[11]["reason"]
    assert all(found[n]["reason"].startswith("not a regular file") for n in (15, 16))


# --- 8. FIFOs and device files -----------------------------------------------------------------


@pytest.mark.timeout(120)
def test_fifo_is_rejected_unopened_by_every_reader(fifo):
    row = _row(fifo)
    result = transforms.hash_and_validate(row, MAX_PIXELS)
    assert isinstance(result, ErrorRecord)
    assert (result.stage, result.category) == (errors.STAGE_READ, errors.UNREADABLE)
    assert result.reason.startswith("not a regular file (a named pipe (FIFO))")

    encode = transforms.EncodeFn(32, MAX_PIXELS, None, 90, threads=1)
    encoded = encode.work(transforms.Accepted("0" * 64, row, "train"))
    assert isinstance(encoded, ErrorRecord) and encoded.category == errors.UNREADABLE
    assert encoded.reason.startswith("not a regular file")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("device", ["/dev/null", "/dev/zero"])
def test_device_files_are_rejected_unread(device, monkeypatch):
    reads = _spy_reads(monkeypatch)
    with pytest.raises(files.FileRejected, match=r"^not a regular file \(a character device\)"):
        files.read_image_bytes(device, images.DEFAULT_MAX_FILE_BYTES)
    result = transforms.hash_and_validate(_row(device), MAX_PIXELS)
    assert (result.category, result.stage) == (errors.UNREADABLE, errors.STAGE_READ)
    assert reads == []


@pytest.mark.timeout(120)
def test_batch_prediction_rejects_special_and_oversized_files(tmp_path, fifo):
    good = tmp_path / "good.png"
    good.write_bytes(photo((10, 200, 10), fmt="PNG"))
    big = tmp_path / "big.png"
    big.write_bytes(good.read_bytes() + b"\0")
    rows = [_row(good, line=1), _row(fifo, line=2), _row("/dev/zero", line=3), _row(big, line=4)]
    cap = len(good.read_bytes())
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create(rows)
            | beam.ParDo(scoring.ReadImageFn(MAX_PIXELS, max_file_bytes=cap)).with_outputs(
                ERRORS, main="ok"
            )
        )
        assert_that(out.ok | beam.Map(lambda kv: kv[0].line), equal_to([1]))
        expected = [(2, errors.UNREADABLE), (3, errors.UNREADABLE), (4, errors.TOO_LARGE)]
        assert_that(
            out[ERRORS]
            | beam.Map(lambda e: (e.line, e.category) if e.stage == errors.STAGE_READ else e),
            equal_to(expected),
            label="errors",
        )


# --- 9. the file-size cap ----------------------------------------------------------------------


def test_file_over_the_cap_is_rejected_from_its_size_without_reading(tmp_path, monkeypatch):
    data = photo((200, 30, 40))
    exact = tmp_path / "exact.jpg"
    exact.write_bytes(data)
    over = tmp_path / "over.jpg"
    over.write_bytes(data + b"\0")
    reads = _spy_reads(monkeypatch)
    with pytest.raises(files.FileRejected) as raised:
        files.read_image_bytes(str(over), len(data))
    assert raised.value.category == errors.TOO_LARGE
    assert f"{len(data) + 1:,} bytes exceeds the limit of {len(data):,}" in raised.value.reason
    assert reads == []
    assert files.read_image_bytes(str(exact), len(data)) == data
    assert sum(reads) <= len(data) + 1 + 64 * 1024  # the file's size + 1, then an EOF probe

    result = transforms.hash_and_validate(_row(over), MAX_PIXELS, max_file_bytes=len(data))
    assert (result.stage, result.category) == (errors.STAGE_READ, errors.TOO_LARGE)
    accepted = transforms.hash_and_validate(_row(exact), MAX_PIXELS, max_file_bytes=len(data))
    assert accepted == images.sha256_hex(data)


def test_default_cap_rejects_a_huge_sparse_file_unread(tmp_path, monkeypatch):
    huge = tmp_path / "huge.jpg"
    with open(huge, "wb") as f:
        f.write(photo((200, 30, 40)))
        f.truncate(images.DEFAULT_MAX_FILE_BYTES + 1)  # sparse: no disk, no memory
    reads = _spy_reads(monkeypatch)
    result = transforms.hash_and_validate(_row(huge), MAX_PIXELS)
    assert isinstance(result, ErrorRecord), result
    assert (result.stage, result.category) == (errors.STAGE_READ, errors.TOO_LARGE)
    assert "--max_file_bytes" in result.reason
    assert reads == []
    assert 2 << 20 <= images.DEFAULT_MAX_FILE_BYTES  # a phone photo fits


def test_file_that_grows_after_the_stat_is_caught_by_the_capped_read(tmp_path, monkeypatch):
    path = tmp_path / "growing.jpg"
    path.write_bytes(b"\xff" * 5000)
    real_stat, real_fstat = os.stat, os.fstat

    def stale(info):  # the size the file had when it was listed
        return os.stat_result((*info[:6], 10, *info[7:]))

    monkeypatch.setattr(os, "stat", lambda *args, **kwargs: stale(real_stat(*args, **kwargs)))
    monkeypatch.setattr(os, "fstat", lambda fd: stale(real_fstat(fd)))
    reads = _spy_reads(monkeypatch)
    with pytest.raises(files.FileRejected, match="grew past the limit of 1,000 bytes") as raised:
        files.read_image_bytes(str(path), 1000)
    assert raised.value.category == errors.TOO_LARGE
    assert sum(reads) <= 1001


class _FakeRemoteFileSystem:
    """A remote filesystem holding objects of known bytes; records what is opened."""

    def __init__(self, objects: dict[str, bytes]):
        self.objects = objects
        self.sizes = {uri: len(data) for uri, data in objects.items()}
        self.opened: list[str] = []

    def metadata(self, path):
        return FileMetadata(path, self.sizes[path])  # KeyError: size unknown

    def open(self, path, mime_type="application/octet-stream", compression_type=None):
        self.opened.append(path)
        return io.BytesIO(self.objects[path])


def test_remote_object_size_is_checked_before_opening(monkeypatch):
    uri = "gs://bucket/img[1].jpg"  # "[" is not a glob here
    fs = _FakeRemoteFileSystem({uri: b"\xff" * 2000})
    monkeypatch.setattr(FileSystems, "get_filesystem", staticmethod(lambda path: fs))
    with pytest.raises(files.FileRejected, match="2,000 bytes exceeds the limit of 1,000"):
        files.read_image_bytes(uri, 1000)
    assert fs.opened == []
    assert files.read_image_bytes(uri, 2000) == b"\xff" * 2000
    del fs.sizes[uri]  # size unknown: the capped read still stops at the cap
    fs.opened.clear()
    with pytest.raises(files.FileRejected, match="grew past the limit") as raised:
        files.read_image_bytes(uri, 1000)
    assert raised.value.category == errors.TOO_LARGE and fs.opened == [uri]


def test_max_file_bytes_must_be_positive():
    for make in (
        lambda: transforms.HashAndValidateFn(MAX_PIXELS, max_file_bytes=0),
        lambda: transforms.EncodeFn(32, MAX_PIXELS, None, 90, max_file_bytes=-1),
        lambda: scoring.ReadImageFn(MAX_PIXELS, max_file_bytes=0),
    ):
        with pytest.raises(ValueError, match="max_file_bytes must be a positive"):
            make()


def test_hash_and_validate_fn_applies_its_cap(tmp_path):
    data = photo((10, 200, 10), fmt="PNG")
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data + b"\0\0")
    rows = [_row(tmp_path / "a.png", line=1), _row(tmp_path / "b.png", line=2)]
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create(rows)
            | beam.ParDo(
                transforms.HashAndValidateFn(MAX_PIXELS, max_file_bytes=len(data) + 1)
            ).with_outputs(ERRORS, main="ok")
        )
        assert_that(out.ok | beam.Map(lambda kv: kv[1].line), equal_to([1]))
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.line, e.category)),
            equal_to([(2, errors.TOO_LARGE)]),
            label="errors",
        )


# --- 10. unreadable class folders --------------------------------------------------------------


def _deny_listing(monkeypatch, denied) -> None:
    """Makes ``os.scandir`` (which ``os.walk`` lists with) of the ``denied`` paths raise."""
    real_scandir = os.scandir

    def scandir(path="."):
        if not isinstance(path, int) and denied(os.fspath(path)):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


@pytest.fixture
def locked_dir(tmp_path, monkeypatch):
    """An image dir whose ``rose/`` and ``tulip/sub/`` cannot be listed (chmod 000; root
    ignores permissions, so for root ``os.scandir`` of those folders raises as it would)."""
    root = tmp_path / "flowers"
    for relative in ("daisy/a.jpg", "rose/b.jpg", "tulip/c.jpg", "tulip/sub/d.jpg"):
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_bytes(b"x")
    locked = [root / "rose", root / "tulip" / "sub"]
    for folder in locked:
        folder.chmod(0)
    if os.geteuid() == 0:
        blocked = {str(folder) for folder in locked}
        _deny_listing(monkeypatch, lambda path: os.path.abspath(path) in blocked)
    yield root
    for folder in locked:
        folder.chmod(stat.S_IRWXU)


def test_unreadable_class_folder_becomes_an_error_record(locked_dir):
    root = str(locked_dir)
    records = list(files.list_image_dir(root))
    assert [(r.row, type(r).__name__) for r in records] == [
        ("daisy/a.jpg", "Row"),
        ("rose/", "ErrorRecord"),
        ("tulip/c.jpg", "Row"),
        ("tulip/sub/", "ErrorRecord"),
    ]
    for error, folder in ((records[1], "rose"), (records[3], "tulip/sub")):
        assert (error.csv, error.line, error.uri) == (root, 0, "")
        assert (error.stage, error.category) == (errors.STAGE_PARSE, errors.UNREADABLE)
        assert repr(os.path.join(root, folder)) in error.reason
        assert "PermissionError" in error.reason


def test_unreadable_class_folder_counts_as_a_read_and_rejected_row(locked_dir):
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create([(SOURCE_IMAGE_DIR, str(locked_dir))])
            | beam.ParDo(transforms.ParseRowsFn()).with_outputs(ERRORS, main="rows")
        )
        assert_that(out.rows | beam.Map(lambda r: r.row), equal_to(["daisy/a.jpg", "tulip/c.jpg"]))
        assert_that(
            out[ERRORS] | beam.Map(lambda e: (e.row, e.category)),
            equal_to([("rose/", errors.UNREADABLE), ("tulip/sub/", errors.UNREADABLE)]),
            label="errors",
        )
    counters = {c.key.metric.name: c.committed for c in p.result.metrics().query()["counters"]}
    assert counters["rows_read"] == 4
    assert counters[f"rows_rejected_{errors.UNREADABLE}"] == 2


def test_image_dir_with_only_unreadable_class_folders_is_refused(tmp_path, monkeypatch):
    (tmp_path / "rose").mkdir()
    (tmp_path / "rose" / "a.jpg").write_bytes(b"x")
    _deny_listing(monkeypatch, lambda path: os.path.basename(path) == "rose")
    with pytest.raises(ValueError, match=r"^--image_dir: .* no readable file .*rose"):
        files.list_image_dir(str(tmp_path))


# --- 11. no accepted row -----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_all_rejected_dataset_has_no_labels(tmp_path, tiny_backbone, capsys):
    (tmp_path / "text.jpg").write_bytes(b"not an image")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("text.jpg,rose\nmissing.jpg,tulip\n/dev/null,daisy\n")
    out = tmp_path / "out"
    argv = [f"--input_csv={csv_path}", f"--output_dir={out}", f"--backbone={tiny_backbone}"]
    assert preprocess.main(argv) == 1
    assert "no row was usable" in capsys.readouterr().err
    manifest = manifest_lib.read_manifest(str(out))
    assert manifest.labels == []
    assert (out / "labels.txt").read_text() == ""
    assert json.loads((out / "manifest.json").read_text())["labels"] == []
    rows = manifest.rows
    assert (rows.read, rows.written, rows.rejected) == (3, 0, 3)
    assert len(_errors(str(out))) == 3
