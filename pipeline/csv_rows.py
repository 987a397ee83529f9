"""Parses label CSVs into rows.

This module owns the parsing rules of the label-CSV format described in
:mod:`schemas.csv_format`: header detection, quoting, line numbers, relative-URI resolution and
the per-row checks. Every accepted data row becomes a :class:`~pipeline.records.Row`; every
rejected one becomes an :class:`~schemas.errors.ErrorRecord` with ``stage="parse"`` and
category :data:`~schemas.errors.BAD_ROW`, so nothing is dropped without a trace. A row whose label
cell is blank is an unlabeled image (``Row.label == ""``, see :attr:`Row.unlabeled
<pipeline.records.Row.unlabeled>`), which the preprocess job writes to the unlabeled split.

There are no Beam transforms here: the functions are plain Python (file access is
:mod:`pipeline.files`, so local paths and ``gs://`` both work) and are wrapped by the pipeline's
composite transforms.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Iterable, Iterator

from apache_beam.io.filesystems import FileSystems

from pipeline import files
from pipeline.files import UriResolver
from pipeline.records import Row
from schemas.csv_format import (
    COLUMNS,
    LABEL_COLUMN,
    SPLIT_COLUMN,
    SPLITS,
    UNLABELED,
    URI_COLUMN,
)
from schemas.errors import BAD_ROW, STAGE_PARSE, ErrorRecord
from schemas.manifest import parse_labels

logger = logging.getLogger(__name__)

_BOM = "\ufeff"
_DEFAULT_COLUMNS = (URI_COLUMN, LABEL_COLUMN)
# Labels are stored one per line (labels.txt, tf.Transform's vocabulary file) and read back with
# str.splitlines, which also breaks at these characters; tf.Transform drops tokens with \n / \r.
_LINE_BREAKS = "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"
# Any C0/C1 control character (tab, NUL, DEL …) or line/paragraph separator.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


class _RowError(ValueError):
    """A data row that breaks a rule; the message is the ErrorRecord's reason."""

    def __init__(self, reason: str, uri: str = "") -> None:
        super().__init__(reason)
        self.uri = uri


def parse_csv(source: str, text: str, *, require_label: bool = True) -> Iterator[Row | ErrorRecord]:
    """Parses the text of one label CSV into rows and error records.

    Format rules:

    * Each data row holds an image URI and a label (columns ``URI_COLUMN``, ``LABEL_COLUMN`` of
      :mod:`schemas.csv_format`). Without a header a row must have exactly these 2 cells.
    * A blank label cell (``a.jpg,``) makes the row an unlabeled image: a ``Row`` whose label
      is "". Such a row cannot be pinned to a labeled split by the split column (a
      ``bad_row``): it goes to ``schemas.csv_format.UNLABELED`` by itself.
    * The first non-blank row is a header when its cells (stripped, case-insensitive) are
      column names from ``schemas.csv_format.COLUMNS`` including the URI and label columns. A
      header may list the columns in any order and may add ``SPLIT_COLUMN``, whose value is one
      of ``SPLITS`` (case-insensitive) or blank for the hashed split. A first row that names
      columns but breaks these rules (unknown, duplicate or missing names) yields ONE error
      record for the header line and nothing else: the file's columns are unknown.
    * A later row that repeats the header (e.g. concatenated files) is a ``bad_row``.
    * A leading UTF-8 BOM is ignored; lines may end in CRLF, LF or CR; fields may be quoted
      (commas, doubled quotes and line breaks inside quotes); blanks around each cell are
      stripped. Whitespace-only lines are skipped and are not data rows.
    * Relative URIs are resolved against the CSV's own folder (local results are absolute
      paths); absolute local paths and URIs with a scheme (``gs://``, ``http://`` ...) are kept
      as-is, except that ``file://`` URIs become local paths.

    Args:
      source: the CSV's path or URI, already resolved (absolute for local files). It is
        recorded in every output and is the base for relative URIs; no I/O is done on it.
      text: the decoded CSV text.
      require_label: False for inputs to score (batch prediction): the label column may be
        missing from the header, a headerless row may hold the URI alone, and the split column
        is not checked against a blank label. True (a label CSV to preprocess): the label
        column is required, though its cell may be blank (an unlabeled image).

    Yields:
      In file order, a ``Row`` per accepted data row and an ``ErrorRecord`` (stage ``"parse"``,
      category :data:`~schemas.errors.BAD_ROW`) per malformed row: wrong column count (a
      one-cell row's reason shows how to write an unlabeled row), empty URI, a label with a line
      break or another control character (:func:`label_problem`), invalid split value, a blank
      label pinned to a labeled split, a repeated header, or a row the ``csv`` module cannot
      parse.
      ``line`` is the 1-based physical line where the row starts (a header is line 1) and
      ``row`` is the row's text as written, without its line terminator.
    """
    if text.startswith(_BOM):
        text = text[1:]
    resolver = UriResolver(source)
    columns: tuple[str, ...] | None = None
    for line, raw, cells, csv_error in _physical_records(text):
        if not raw.strip():
            continue
        if csv_error is not None:
            columns = columns or _DEFAULT_COLUMNS
            yield _error(source, line, raw, "", f"unparseable CSV row: {csv_error}")
            continue
        cells = [cell.strip() for cell in cells]
        if columns is None:
            header, problem = _read_header(cells, require_label)
            if problem is not None:
                reason = f"{problem}; no row of this file was read"
                logger.warning("%s line %d: %s", source, line, reason)
                yield _error(source, line, raw, "", reason)
                return
            columns = header or _DEFAULT_COLUMNS
            if header:
                continue
        try:
            record: Row | ErrorRecord = _parse_row(
                source, line, raw, cells, columns, resolver, require_label
            )
        except _RowError as err:
            record = _error(source, line, raw, err.uri, str(err))
        yield record


def label_problem(label: str) -> str | None:
    """Why ``label`` cannot be a label, or None when it can.

    Labels are written one per line to ``labels.txt`` and to tf.Transform's vocabulary, so a
    label with a line break (any character ``str.splitlines`` breaks at: LF, CR, VT, FF,
    U+001C..U+001E, U+0085, U+2028, U+2029) would become two labels, or none, and crash the job
    after every image was read. Other control characters (tab, NUL, DEL, C1) are refused too:
    they are invisible in a summary or a confusion matrix and are always a data mistake.
    """
    found = _CONTROL.search(label)
    if found is None:
        return None
    char = found.group()
    what = "a line break" if char in _LINE_BREAKS else "a control character"
    return (
        f"label {label!r} contains {what} (U+{ord(char):04X}); labels are stored one per line "
        "in labels.txt and must be printable text"
    )


def read_csv(path: str, *, require_label: bool = True) -> Iterator[Row | ErrorRecord]:
    """Reads one label CSV and parses it with :func:`parse_csv`.

    The file is opened with ``FileSystems.open`` (any Beam filesystem; compressed files such as
    ``.csv.gz`` are decompressed by extension) and decoded as UTF-8, a BOM allowed. A file that
    is not valid UTF-8 yields ONE ``ErrorRecord`` for the whole file (``line`` 0, empty
    ``row``, category :data:`~schemas.errors.BAD_ROW`) whose reason names the offending byte and its line; none
    of its rows are read.

    Args:
      path: the CSV's path or URI, as returned by :func:`pipeline.files.resolve_csv_patterns`.

    Yields:
      The rows and error records of :func:`parse_csv`.

    Raises:
      BeamIOError / OSError: when the file cannot be opened or read.
    """
    path = files.file_uri_to_path(path.strip())
    with FileSystems.open(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")  # parse_csv drops a BOM; offsets in errors stay file offsets
    except UnicodeDecodeError as err:
        reason = _decode_error_reason(data, err)
        logger.warning("%s: %s", path, reason)
        yield ErrorRecord(path, 0, "", "", STAGE_PARSE, reason, BAD_ROW)
        return
    yield from parse_csv(path, text, require_label=require_label)


# --- helpers -------------------------------------------------------------------------------


def _physical_records(
    text: str,
) -> Iterator[tuple[int, str, list[str], csv.Error | None]]:
    """Yields ``(start_line, raw_text, cells, csv_error)`` for each CSV record of ``text``.

    ``io.StringIO(newline="")`` splits physical lines on LF, CRLF and CR while keeping the
    terminators, which is what ``csv.reader`` needs for quoted line breaks; the lines the reader
    consumes for a record are kept to give its raw text and starting line.
    """
    consumed: list[str] = []

    def lines() -> Iterable[str]:
        for physical_line in io.StringIO(text, newline=""):
            consumed.append(physical_line)
            yield physical_line

    reader = csv.reader(lines(), skipinitialspace=True)
    next_line = 1
    while True:
        cells: list[str] = []
        error: csv.Error | None = None
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            error = err
        raw = "".join(consumed)
        consumed.clear()
        yield next_line, _strip_terminator(raw), cells, error
        next_line = reader.line_num + 1


def _strip_terminator(raw: str) -> str:
    if raw.endswith("\r\n"):
        return raw[:-2]
    if raw.endswith(("\n", "\r")):
        return raw[:-1]
    return raw


def _read_header(
    cells: list[str], require_label: bool = True
) -> tuple[tuple[str, ...] | None, str | None]:
    """Returns ``(columns, None)`` for a header, ``(None, None)`` for a data row, or
    ``(None, problem)`` for a first row that names columns but is not a valid header."""
    names = [cell.lower() for cell in cells]
    named = [name for name in names if name]
    if URI_COLUMN not in names and not (named and all(name in COLUMNS for name in named)):
        return None, None
    expected = (
        f"a header names the columns {URI_COLUMN}, {LABEL_COLUMN} and optionally "
        f"{SPLIT_COLUMN}, in any order"
    )
    if "" in names:
        return None, f"header has an empty column name (a stray comma?); {expected}"
    unknown = [cell for cell, name in zip(cells, names, strict=True) if name not in COLUMNS]
    if unknown:
        return None, f"header has unknown column(s) {unknown}; {expected}"
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        return None, f"header repeats column(s) {duplicates}; {expected}"
    required = _DEFAULT_COLUMNS if require_label else (URI_COLUMN,)
    missing = [name for name in required if name not in names]
    if missing:
        return None, f"header lacks column(s) {missing}; {expected}"
    return tuple(names), None


def _is_repeated_header(cells: list[str]) -> bool:
    names = {cell.lower() for cell in cells}
    return URI_COLUMN in names and LABEL_COLUMN in names and names <= set(COLUMNS)


def _parse_row(
    source: str,
    line: int,
    raw: str,
    cells: list[str],
    columns: tuple[str, ...],
    resolver: UriResolver,
    require_label: bool = True,
) -> Row:
    """Checks one data row against ``columns``; raises ``_RowError`` with the reason."""
    if _is_repeated_header(cells):
        raise _RowError("a header row repeated mid-file (concatenated CSVs?)")
    if not require_label and columns == _DEFAULT_COLUMNS and len(cells) == 1:
        cells = [cells[0], ""]  # a headerless list of URIs to score
    if len(cells) != len(columns):
        reason = f"expected {len(columns)} columns ({','.join(columns)}), got {len(cells)}"
        if SPLIT_COLUMN not in columns and len(cells) == len(COLUMNS):
            reason += f"; a {SPLIT_COLUMN} column needs a header row such as {','.join(COLUMNS)}"
        if "\n" in raw or "\r" in raw:
            reason += "; the row spans several lines: is a closing quote missing?"
        elif len(cells) == 1 and columns[0] == URI_COLUMN and require_label:
            unlabeled_row = raw.strip() + "," * (len(columns) - 1)
            reason += (
                f"; for an image without a label keep the {LABEL_COLUMN} cell and leave it "
                f"blank ({unlabeled_row}): it goes to the {UNLABELED} split"
            )
        raise _RowError(reason)
    values = dict(zip(columns, cells, strict=True))
    if not values[URI_COLUMN]:
        raise _RowError(f"empty {URI_COLUMN}")
    try:
        uri = resolver.resolve(values[URI_COLUMN])
    except ValueError as err:
        raise _RowError(str(err)) from err
    label = values.get(LABEL_COLUMN, "")  # blank: an unlabeled image
    problem = label_problem(label)
    if problem is not None:
        raise _RowError(problem, uri)
    split = values.get(SPLIT_COLUMN, "").lower() or None
    if split is not None and split not in SPLITS:
        reason = (
            f"invalid {SPLIT_COLUMN} {values[SPLIT_COLUMN]!r}; expected one of "
            f"{', '.join(SPLITS)} (any case) or blank for the hashed split"
        )
        if split == UNLABELED:
            reason += f"; a row with a blank {LABEL_COLUMN} goes to the {UNLABELED} split by itself"
        raise _RowError(reason, uri)
    if split is not None and not label and require_label:
        raise _RowError(
            f"blank {LABEL_COLUMN} with {SPLIT_COLUMN} {values[SPLIT_COLUMN]!r}: a row without a "
            f"label goes to the {UNLABELED} split and cannot be pinned to {split}; give it a "
            f"{LABEL_COLUMN}, or leave {SPLIT_COLUMN} blank to keep it unlabeled",
            uri,
        )
    return Row(source, line, raw, uri, label, split)


def _error(source: str, line: int, raw: str, uri: str, reason: str) -> ErrorRecord:
    return ErrorRecord(source, line, raw, uri, STAGE_PARSE, reason, BAD_ROW)


def _decode_error_reason(data: bytes, err: UnicodeDecodeError) -> str:
    valid_prefix = data[: err.start].decode("utf-8")
    line = len(io.StringIO(valid_prefix + "x", newline="").readlines())
    bad = data[err.start : err.start + 1].hex()
    return (
        f"file is not UTF-8 text (byte 0x{bad} at offset {err.start}, line {line}); "
        "save it as UTF-8; none of its rows were read"
    )


def read_label_dict(path: str) -> list[str]:
    """The labels of a ``--label_dict`` file, in index order.

    Raises:
      ValueError: naming ``--label_dict`` when it cannot be read, is empty or repeats a label.
    """
    try:
        with FileSystems.open(path) as f:
            text = f.read().decode("utf-8-sig")
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"--label_dict: cannot read {path!r}: {e}") from e
    labels = [label.strip() for label in parse_labels(text) if label.strip()]
    if not labels:
        raise ValueError(f"--label_dict: {path!r} holds no labels")
    for label in labels:
        if problem := label_problem(label):
            raise ValueError(f"--label_dict: {path!r}: {problem}")
    duplicates = sorted({x for x in labels if labels.count(x) > 1})
    if duplicates:
        raise ValueError(f"--label_dict: {path!r} lists {duplicates} more than once")
    return labels
