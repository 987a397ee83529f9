"""Unit tests for pipeline.csv_rows: label-CSV parsing, CSV globbing and --image_dir listing."""

from __future__ import annotations

import gzip
import os

import pytest

from pipeline.csv_rows import parse_csv, read_csv
from pipeline.files import list_image_dir, resolve_csv_patterns
from pipeline.records import Row
from schemas.csv_format import EVAL, LABEL_COLUMN, SPLIT_COLUMN, TEST, TRAIN, UNLABELED, URI_COLUMN
from schemas.errors import ErrorRecord

SOURCE = "/data/set/labels.csv"
GCS_SOURCE = "gs://bucket/dir/labels.csv"
HEADER = f"{URI_COLUMN},{LABEL_COLUMN}"


def parse(text: str, source: str = SOURCE) -> list[Row | ErrorRecord]:
    return list(parse_csv(source, text))


def only_rows(records: list[Row | ErrorRecord]) -> list[Row]:
    assert all(isinstance(r, Row) for r in records), records
    return records  # type: ignore[return-value]


def only_error(records: list[Row | ErrorRecord]) -> ErrorRecord:
    assert len(records) == 1 and isinstance(records[0], ErrorRecord), records
    return records[0]


# --- parse_csv: layout -------------------------------------------------------------------------


def test_plain_rows_without_header():
    records = parse("a.jpg,roses\nb.jpg,tulips\n")
    assert records == [
        Row(SOURCE, 1, "a.jpg,roses", "/data/set/a.jpg", "roses", None),
        Row(SOURCE, 2, "b.jpg,tulips", "/data/set/b.jpg", "tulips", None),
    ]


def test_empty_text_yields_nothing():
    assert parse("") == []
    assert parse("\n \r\n") == []


def test_header_with_split_column_in_any_order():
    text = (
        f"{SPLIT_COLUMN},{LABEL_COLUMN},{URI_COLUMN}\n"
        "TRAIN,roses,a.jpg\n"
        ",tulips,b.jpg\n"
        "Eval,daisy,c.jpg\n"
        " test ,daisy,d.jpg\n"
    )
    records = only_rows(parse(text))
    assert [(r.line, r.uri, r.label, r.split) for r in records] == [
        (2, "/data/set/a.jpg", "roses", TRAIN),
        (3, "/data/set/b.jpg", "tulips", None),
        (4, "/data/set/c.jpg", "daisy", EVAL),
        (5, "/data/set/d.jpg", "daisy", TEST),
    ]


def test_header_detection_is_case_insensitive_and_strips_cells():
    text = f" {URI_COLUMN.upper()} , {LABEL_COLUMN.title()} \na.jpg,roses\n"
    assert parse(text) == [Row(SOURCE, 2, "a.jpg,roses", "/data/set/a.jpg", "roses", None)]


def test_header_only_file_has_no_rows():
    assert parse(HEADER + "\n") == []


def test_utf8_bom_is_stripped_before_header_detection():
    records = parse("\ufeff" + HEADER + "\r\na.jpg,roses\r\n")
    assert records == [Row(SOURCE, 2, "a.jpg,roses", "/data/set/a.jpg", "roses", None)]


def test_utf8_bom_is_stripped_from_first_uri_without_header():
    records = only_rows(parse("\ufeffa.jpg,roses\n"))
    assert records[0].uri == "/data/set/a.jpg"
    assert records[0].row == "a.jpg,roses"


@pytest.mark.parametrize("eol", ["\r\n", "\r", "\n"], ids=["crlf", "cr", "lf"])
def test_line_endings(eol):
    text = eol.join([HEADER, "a.jpg,roses", "", "b.jpg,tulips"]) + eol
    records = only_rows(parse(text))
    assert [(r.line, r.row, r.label) for r in records] == [
        (2, "a.jpg,roses", "roses"),
        (4, "b.jpg,tulips", "tulips"),
    ]


def test_quoted_fields_with_commas_and_doubled_quotes():
    raw = '"a, b.jpg","say ""hi"", bye"'
    records = parse(raw + "\n")
    assert records == [Row(SOURCE, 1, raw, "/data/set/a, b.jpg", 'say "hi", bye', None)]


@pytest.mark.parametrize("eol", ["\r\n", "\r", "\n"], ids=["crlf", "cr", "lf"])
def test_quoted_field_spanning_lines_keeps_start_line_and_raw_text(eol):
    # A label cannot hold a line break (labels.txt has one label per line): the row is
    # rejected, and both it and the next row keep their physical start lines.
    first = f'a.jpg,"two{eol}line{eol}label"'
    text = eol.join([HEADER, first, "b.jpg,x", ""])
    error, row = parse(text)
    assert isinstance(error, ErrorRecord) and isinstance(row, Row)
    assert (error.line, error.row, error.uri) == (2, first, "/data/set/a.jpg")
    assert "contains a line break" in error.reason
    assert (row.line, row.row, row.label) == (5, "b.jpg,x", "x")


def test_surrounding_blanks_of_every_cell_are_stripped():
    text = f'  {URI_COLUMN} ,\t{LABEL_COLUMN}  \n  a.jpg  ,  roses  \n "b c.jpg" , " tulips " \n'
    records = only_rows(parse(text))
    assert [(r.uri, r.label) for r in records] == [
        ("/data/set/a.jpg", "roses"),
        ("/data/set/b c.jpg", "tulips"),
    ]
    assert records[0].row == "  a.jpg  ,  roses  "


def test_blank_lines_are_skipped_and_not_counted_as_rows():
    text = "\n   \n" + HEADER + "\n\t\na.jpg,x\n\n  \nb.jpg,y"
    records = only_rows(parse(text))
    assert [(r.line, r.uri) for r in records] == [(5, "/data/set/a.jpg"), (8, "/data/set/b.jpg")]


def test_whitespace_only_line_inside_quotes_is_part_of_the_field():
    text = '"x\n   \ny.jpg",a\nb.jpg,z\n'
    records = only_rows(parse(text))
    assert [(r.line, r.uri, r.label) for r in records] == [
        (1, "/data/set/x\n   \ny.jpg", "a"),
        (4, "/data/set/b.jpg", "z"),
    ]


# --- parse_csv: URI resolution ----------------------------------------------------------------


def test_relative_uris_resolve_against_local_csv_folder(tmp_path):
    source = str(tmp_path / "sub" / "labels.csv")
    records = only_rows(parse("img/1.jpg,a\n./2.jpg,b\n../up.jpg,c\n", source=source))
    assert [r.uri for r in records] == [
        str(tmp_path / "sub" / "img" / "1.jpg"),
        str(tmp_path / "sub" / "2.jpg"),
        str(tmp_path / "up.jpg"),
    ]


def test_relative_uris_resolve_against_relative_local_source(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    records = only_rows(parse("img/1.jpg,a\n", source="labels.csv"))
    assert records[0].uri == str(tmp_path / "img" / "1.jpg")
    assert records[0].source == "labels.csv"


def test_relative_uris_resolve_against_gcs_csv_folder():
    records = only_rows(parse("img/1.jpg,a\n./img/2.jpg,b\n../other/3.jpg,c\n", source=GCS_SOURCE))
    assert [(r.source, r.uri) for r in records] == [
        (GCS_SOURCE, "gs://bucket/dir/img/1.jpg"),
        (GCS_SOURCE, "gs://bucket/dir/img/2.jpg"),
        (GCS_SOURCE, "gs://bucket/other/3.jpg"),
    ]


def test_relative_uri_climbing_above_the_bucket_is_an_error():
    error = only_error(parse("../../x.jpg,a\n", source=GCS_SOURCE))
    assert (error.line, error.row, error.category) == (1, "../../x.jpg,a", "bad_row")
    assert "climbs above gs://bucket" in error.reason


@pytest.mark.parametrize("source", [SOURCE, GCS_SOURCE])
def test_absolute_paths_and_uris_with_a_scheme_are_kept(source):
    text = (
        "/abs/x.jpg,a\n"
        "gs://other/y.jpg,b\n"
        "  s3://b3/z.jpg  ,c\n"
        "https://host/p/q.jpg?v=1,d\n"
        "file:///tmp/w%20v.jpg,e\n"
    )
    records = only_rows(parse(text, source=source))
    assert [r.uri for r in records] == [
        "/abs/x.jpg",
        "gs://other/y.jpg",
        "s3://b3/z.jpg",
        "https://host/p/q.jpg?v=1",
        "/tmp/w v.jpg",
    ]


# --- parse_csv: errors ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "reason_part"),
    [
        ("a.jpg,roses,train", "expected 2 columns"),
        ("a.jpg", "expected 2 columns"),
        (" ,roses", f"empty {URI_COLUMN}"),
    ],
    ids=["three_columns_no_header", "one_column", "empty_uri"],
)
def test_malformed_rows_become_error_records(bad, reason_part):
    records = parse(f"ok1.jpg,x\n\n{bad}\nok2.jpg,y\n")
    assert [type(r) for r in records] == [Row, ErrorRecord, Row]
    error = records[1]
    assert error.csv == SOURCE
    assert error.line == 3
    assert error.row == bad
    assert error.stage == "parse"
    assert error.category == "bad_row"
    assert reason_part in error.reason
    assert records[2].line == 4


def test_third_column_without_header_says_a_header_is_needed():
    error = only_error(parse("a.jpg,roses,train\n"))
    assert "needs a header row" in error.reason
    assert SPLIT_COLUMN in error.reason


def test_wrong_column_count_with_header():
    text = f"{URI_COLUMN},{LABEL_COLUMN},{SPLIT_COLUMN}\na.jpg,roses\n"
    error = only_error(parse(text))
    assert (error.line, error.row) == (2, "a.jpg,roses")
    assert "expected 3 columns" in error.reason


def test_blank_label_is_an_unlabeled_row():
    records = only_rows(parse("a.jpg,  \nb.jpg,roses\n"))
    assert records[0] == Row(SOURCE, 1, "a.jpg,  ", "/data/set/a.jpg", "", None)
    assert records[0].unlabeled and not records[1].unlabeled


def test_blank_label_cell_with_header_is_an_unlabeled_row():
    text = f'{LABEL_COLUMN},{URI_COLUMN},{SPLIT_COLUMN}\n,a.jpg,\n"",b.jpg,\n'
    records = only_rows(parse(text))
    assert [(r.line, r.uri, r.label, r.split) for r in records] == [
        (2, "/data/set/a.jpg", "", None),
        (3, "/data/set/b.jpg", "", None),
    ]


def test_one_cell_row_says_how_to_write_an_unlabeled_row():
    error = only_error(parse("a.jpg\n"))
    assert error.category == "bad_row"
    assert "expected 2 columns" in error.reason
    assert "(a.jpg,)" in error.reason and UNLABELED in error.reason
    with_split = only_error(parse(f"{HEADER},{SPLIT_COLUMN}\na.jpg\n"))
    assert "(a.jpg,,)" in with_split.reason


@pytest.mark.parametrize("split", [TRAIN, "Eval", TEST])
def test_blank_label_pinned_to_a_labeled_split_is_a_bad_row(split):
    text = f"{HEADER},{SPLIT_COLUMN}\na.jpg,,{split}\nb.jpg,roses,{split}\n"
    records = parse(text)
    assert [type(r) for r in records] == [ErrorRecord, Row]
    error = records[0]
    assert (error.line, error.row, error.uri) == (2, f"a.jpg,,{split}", "/data/set/a.jpg")
    assert error.category == "bad_row"
    assert f"blank {LABEL_COLUMN}" in error.reason
    assert UNLABELED in error.reason and repr(split) in error.reason


def test_split_column_cannot_name_the_unlabeled_split():
    records = parse(f"{HEADER},{SPLIT_COLUMN}\na.jpg,,{UNLABELED}\nb.jpg,roses,{UNLABELED}\n")
    assert [type(r) for r in records] == [ErrorRecord, ErrorRecord]
    assert all(f"invalid {SPLIT_COLUMN}" in e.reason for e in records)
    assert f"blank {LABEL_COLUMN} goes to the {UNLABELED} split" in records[0].reason


def test_invalid_split_value_names_value_and_allowed_ones():
    text = f"{URI_COLUMN},{LABEL_COLUMN},{SPLIT_COLUMN}\na.jpg,roses,validation\n"
    error = only_error(parse(text))
    assert (error.line, error.row, error.category) == (2, "a.jpg,roses,validation", "bad_row")
    assert error.uri == "/data/set/a.jpg"
    assert "'validation'" in error.reason
    for split in (TRAIN, EVAL, TEST):
        assert split in error.reason


def test_error_line_is_start_of_multiline_row():
    text = 'ok.jpg,x\n"b.jpg\nc",d,e\n'
    records = parse(text)
    assert isinstance(records[1], ErrorRecord)
    assert (records[1].line, records[1].row) == (2, '"b.jpg\nc",d,e')


def test_unterminated_quote_hints_at_missing_closing_quote():
    error = only_error(parse('"a.jpg,roses\nb.jpg,tulips\n'))
    assert error.line == 1
    assert error.row == '"a.jpg,roses\nb.jpg,tulips'
    assert "closing quote" in error.reason


def test_repeated_header_mid_file_is_an_error():
    records = parse(f"{HEADER}\na.jpg,x\n{HEADER.upper()}\nb.jpg,y\n")
    assert [type(r) for r in records] == [Row, ErrorRecord, Row]
    assert records[1].line == 3
    assert "header row repeated" in records[1].reason


@pytest.mark.parametrize(
    ("header", "reason_part"),
    [
        (f"{URI_COLUMN},{LABEL_COLUMN},weight", "unknown column(s) ['weight']"),
        (f"{URI_COLUMN},{SPLIT_COLUMN}", f"lacks column(s) ['{LABEL_COLUMN}']"),
        (f"{URI_COLUMN},{LABEL_COLUMN},{LABEL_COLUMN.upper()}", "repeats column(s)"),
        (f"{URI_COLUMN},{LABEL_COLUMN},", "empty column name"),
    ],
    ids=["unknown", "missing_label", "duplicate", "trailing_comma"],
)
def test_invalid_header_yields_one_error_and_stops(header, reason_part):
    error = only_error(parse(f"\n{header}\na.jpg,roses,x\nb.jpg,tulips\n"))
    assert (error.line, error.row, error.category) == (2, header, "bad_row")
    assert reason_part in error.reason
    assert "no row of this file was read" in error.reason


# --- read_csv ---------------------------------------------------------------------------------


def test_read_csv_decodes_bom_and_resolves_against_file_folder(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_bytes(b"\xef\xbb\xbf" + HEADER.encode() + b"\r\nimg/a.jpg,caf\xc3\xa9\r\n")
    records = list(read_csv(str(path)))
    assert records == [
        Row(str(path), 2, "img/a.jpg,caf\u00e9", str(tmp_path / "img" / "a.jpg"), "caf\u00e9")
    ]


def test_read_csv_reads_gzipped_csv(tmp_path):
    path = tmp_path / "labels.csv.gz"
    path.write_bytes(gzip.compress(b"a.jpg,roses\n"))
    assert [r.uri for r in read_csv(str(path))] == [str(tmp_path / "a.jpg")]


def test_non_utf8_file_yields_one_file_level_error(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes(b"a.jpg,roses\nb.jpg,caf\xe9\nc.jpg,x\n")
    error = only_error(list(read_csv(str(path))))
    assert error == ErrorRecord(str(path), 0, "", "", "parse", error.reason, "bad_row")
    assert "not UTF-8" in error.reason
    assert "0xe9" in error.reason
    assert "line 2" in error.reason
    assert "offset 21" in error.reason


def test_non_utf8_error_offset_counts_the_bom_and_cr_lines(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfa.jpg,x\rb.jpg,\xff\r")
    error = only_error(list(read_csv(str(path))))
    assert "byte 0xff at offset 17, line 2" in error.reason


# --- resolve_csv_patterns ---------------------------------------------------------------------


def test_resolve_csv_patterns_expands_globs_sorted_and_unique(tmp_path):
    for name in ("b.csv", "a.csv", "notes.txt"):
        (tmp_path / name).write_text("x.jpg,y\n")
    (tmp_path / "nested").mkdir()
    (tmp_path / "nested" / "c.csv").write_text("x.jpg,y\n")
    paths = resolve_csv_patterns([str(tmp_path / "*.csv"), str(tmp_path / "a.csv")])
    assert paths == [str(tmp_path / "a.csv"), str(tmp_path / "b.csv")]


def test_resolve_csv_patterns_makes_local_paths_absolute(tmp_path, monkeypatch):
    (tmp_path / "a.csv").write_text("x.jpg,y\n")
    monkeypatch.chdir(tmp_path)
    assert resolve_csv_patterns(["a.csv"]) == [str(tmp_path / "a.csv")]
    assert resolve_csv_patterns(["*.csv"]) == [str(tmp_path / "a.csv")]
    assert resolve_csv_patterns([f"file://{tmp_path}/a.csv"]) == [str(tmp_path / "a.csv")]


def test_resolve_csv_patterns_missing_file_names_the_flag(tmp_path):
    missing = str(tmp_path / "missing.csv")
    with pytest.raises(ValueError) as info:
        resolve_csv_patterns([missing])
    assert str(info.value) == f"--input_csv: no file matches '{missing}'"


def test_resolve_csv_patterns_glob_matching_nothing_names_the_flag(tmp_path):
    (tmp_path / "a.csv").write_text("x.jpg,y\n")
    pattern = str(tmp_path / "*.tsv")
    with pytest.raises(ValueError, match=r"^--input_csv: no file matches '.*\*\.tsv'$"):
        resolve_csv_patterns([str(tmp_path / "a.csv"), pattern])


def test_resolve_csv_patterns_rejects_directory(tmp_path):
    with pytest.raises(ValueError, match=r"--input_csv: .* is a directory"):
        resolve_csv_patterns([str(tmp_path)])


def test_resolve_csv_patterns_rejects_empty_value():
    with pytest.raises(ValueError, match="--input_csv: empty value"):
        resolve_csv_patterns(["  "])


# --- list_image_dir ---------------------------------------------------------------------------


@pytest.fixture
def image_dir(tmp_path):
    root = tmp_path / "flowers"
    for relative in (
        "tulips/c.jpg",
        "roses/b.jpg",
        "roses/a.jpg",
        "roses/.DS_Store",
        ".cache/x.jpg",
        "stray.jpg",
        ".hidden_top",
        "roses/sub/deep.jpg",
    ):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\xff\xd8")
    return root


def test_list_image_dir_rows_errors_and_hidden_files(image_dir):
    root = str(image_dir)
    records = list(list_image_dir(root))
    rows = [r for r in records if isinstance(r, Row)]
    errors = [r for r in records if isinstance(r, ErrorRecord)]
    assert rows == [
        Row(root, 0, "roses/a.jpg", os.path.join(root, "roses", "a.jpg"), "roses", None),
        Row(root, 0, "roses/b.jpg", os.path.join(root, "roses", "b.jpg"), "roses", None),
        Row(root, 0, "tulips/c.jpg", os.path.join(root, "tulips", "c.jpg"), "tulips", None),
    ]
    assert [(e.csv, e.line, e.row, e.uri, e.category) for e in errors] == [
        (root, 0, "roses/sub/deep.jpg", os.path.join(root, "roses/sub/deep.jpg"), "bad_row"),
        (root, 0, "stray.jpg", os.path.join(root, "stray.jpg"), "bad_row"),
    ]
    assert "not in a class sub-folder" in errors[1].reason
    assert "nested below the class folder 'roses'" in errors[0].reason
    assert [r.row for r in records] == sorted(r.row for r in records)


def test_list_image_dir_accepts_relative_and_trailing_slash(image_dir, monkeypatch):
    monkeypatch.chdir(image_dir.parent)
    rows = [r for r in list_image_dir("flowers/") if isinstance(r, Row)]
    assert [(r.source, r.uri) for r in rows][0] == (
        str(image_dir),
        str(image_dir / "roses" / "a.jpg"),
    )


def test_list_image_dir_missing_dir_raises_at_call(tmp_path):
    with pytest.raises(ValueError, match=r"^--image_dir: .*missing.* is not a directory"):
        list_image_dir(str(tmp_path / "missing"))


def test_list_image_dir_without_class_folders_raises(tmp_path):
    (tmp_path / "flat.jpg").write_bytes(b"x")
    (tmp_path / "empty_class").mkdir()
    with pytest.raises(ValueError, match=r"^--image_dir: .*holds no file in a class sub-folder"):
        list_image_dir(str(tmp_path))


def test_labels_optional_for_scoring():
    from pipeline.csv_rows import parse_csv

    text = "a.jpg\nb.jpg,rose\n"
    rows = list(parse_csv("/d/in.csv", text, require_label=False))
    assert [(r.uri, r.label) for r in rows] == [("/d/a.jpg", ""), ("/d/b.jpg", "rose")]
    header_only_uri = list(parse_csv("/d/in.csv", "image_uri\nc.jpg\n", require_label=False))
    assert [(r.line, r.uri, r.label) for r in header_only_uri] == [(2, "/d/c.jpg", "")]
    # scoring ignores labels: a blank one may sit next to a split value
    pinned = list(
        parse_csv("/d/in.csv", "image_uri,label,split\nd.jpg,,test\n", require_label=False)
    )
    assert [(r.uri, r.label, r.split) for r in pinned] == [("/d/d.jpg", "", "test")]
    # the training contract is unchanged
    strict = list(parse_csv("/d/in.csv", text))
    assert [type(r).__name__ for r in strict] == ["ErrorRecord", "Row"]
