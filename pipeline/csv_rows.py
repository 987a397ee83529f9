"""Turns the job's inputs (label CSVs, or an image folder with one sub-folder per class) into rows.

This module owns the parsing rules of the label-CSV format described in
:mod:`schemas.csv_format`: header detection, quoting, line numbers, relative-URI resolution and
the per-row checks. Every accepted data row becomes a :class:`~pipeline.records.Row`; every
rejected one becomes an :class:`~pipeline.records.ErrorRecord` with ``stage="parse"`` and
category ``"bad_row"``, so nothing is dropped without a trace.

There are no Beam transforms here: the functions are plain Python (I/O goes through
``apache_beam.io.filesystems.FileSystems``, so local paths and ``gs://`` both work) and are
wrapped by the pipeline's composite transforms.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import posixpath
import urllib.parse
import urllib.request
from collections.abc import Iterable, Iterator, Sequence

from apache_beam.io.filesystem import BeamIOError, FileMetadata
from apache_beam.io.filesystems import FileSystems

from pipeline.records import ErrorRecord, Row
from schemas.csv_format import COLUMNS, LABEL_COLUMN, SPLIT_COLUMN, SPLITS, URI_COLUMN

logger = logging.getLogger(__name__)

PARSE_STAGE = "parse"
BAD_ROW = "bad_row"

_BOM = "\ufeff"
_FILE_SCHEME = "file"
_DEFAULT_COLUMNS = (URI_COLUMN, LABEL_COLUMN)
_GLOB_CHARS = frozenset("*?[")


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
        missing from the header, a headerless row may hold the URI alone, and a blank label
        is allowed (``Row.label`` is then "").

    Yields:
      In file order, a ``Row`` per accepted data row and an ``ErrorRecord`` (stage ``"parse"``,
      category ``"bad_row"``) per malformed row: wrong column count, empty URI, empty label,
      invalid split value, a repeated header, or a row the ``csv`` module cannot parse.
      ``line`` is the 1-based physical line where the row starts (a header is line 1) and
      ``row`` is the row's text as written, without its line terminator.
    """
    if text.startswith(_BOM):
        text = text[1:]
    resolver = _UriResolver(source)
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


def read_csv(path: str, *, require_label: bool = True) -> Iterator[Row | ErrorRecord]:
    """Reads one label CSV and parses it with :func:`parse_csv`.

    The file is opened with ``FileSystems.open`` (any Beam filesystem; compressed files such as
    ``.csv.gz`` are decompressed by extension) and decoded as UTF-8, a BOM allowed. A file that
    is not valid UTF-8 yields ONE ``ErrorRecord`` for the whole file (``line`` 0, empty
    ``row``, category ``"bad_row"``) whose reason names the offending byte and its line; none
    of its rows are read.

    Args:
      path: the CSV's path or URI, as returned by :func:`resolve_csv_patterns`.

    Yields:
      The rows and error records of :func:`parse_csv`.

    Raises:
      BeamIOError / OSError: when the file cannot be opened or read.
    """
    path = _file_uri_to_path(path.strip())
    with FileSystems.open(path) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")  # parse_csv drops a BOM; offsets in errors stay file offsets
    except UnicodeDecodeError as err:
        reason = _decode_error_reason(data, err)
        logger.warning("%s: %s", path, reason)
        yield ErrorRecord(path, 0, "", "", PARSE_STAGE, reason, BAD_ROW)
        return
    yield from parse_csv(path, text, require_label=require_label)


def resolve_csv_patterns(patterns: Sequence[str]) -> list[str]:
    """Expands ``--input_csv`` values (file paths or globs, any Beam filesystem).

    Args:
      patterns: the flag's values. ``file://`` URIs are treated as local paths.

    Returns:
      The sorted, de-duplicated matched paths; local paths are made absolute.

    Raises:
      ValueError: naming ``--input_csv`` when a value is empty, a pattern matches no file (a
        missing plain path included), a plain local path is a directory, or the filesystem
        cannot list the pattern.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    found: set[str] = set()
    for pattern in patterns:
        pattern = pattern.strip()
        if not pattern:
            raise ValueError(
                "--input_csv: empty value; pass a CSV path or a glob such as 'd/*.csv'"
            )
        path = _file_uri_to_path(pattern)
        is_local = FileSystems.get_scheme(path) is None
        if is_local:
            path = os.path.abspath(path)  # Beam's local match cannot list a relative glob
        if is_local and not _has_glob(path) and os.path.isdir(path):
            raise ValueError(
                f"--input_csv: {pattern!r} is a directory; pass a CSV file or a glob such as "
                f"{posixpath.join(pattern, '*.csv')!r}"
            )
        matched = [meta.path for meta in _match(path, flag="--input_csv", shown=pattern)]
        if not matched:
            raise ValueError(f"--input_csv: no file matches {pattern!r}")
        logger.info("--input_csv %r matched %d file(s)", pattern, len(matched))
        found.update(matched)
    return sorted(found)


def list_image_dir(image_dir: str) -> Iterator[Row | ErrorRecord]:
    """Lists an ``--image_dir`` laid out as one sub-folder per class: ``DIR/<label>/<file>``.

    The folder is listed once, eagerly, with ``FileSystems.match`` (local paths and ``gs://``),
    so a bad ``--image_dir`` raises when this is called, not when the result is iterated.
    Hidden entries (a file or folder name starting with ``'.'``, e.g. ``.DS_Store``) are
    skipped. Files directly in ``DIR`` and files nested below a class folder
    (``DIR/<label>/sub/<file>``) become ``ErrorRecord`` s with category ``"bad_row"``.

    Args:
      image_dir: the folder (local path, ``file://`` or a Beam filesystem URI).

    Returns:
      An iterator, sorted by path, of a ``Row`` per class file (``source`` = the folder,
      absolute for local; ``line`` 0; ``row`` = the path relative to the folder, ``/``-separated;
      ``label`` = the class folder's name; ``split`` None) and the error records above.

    Raises:
      ValueError: naming ``--image_dir`` when the folder does not exist or holds no file in a
        class sub-folder.
    """
    root = _file_uri_to_path(image_dir.strip())
    is_local = FileSystems.get_scheme(root) is None
    if is_local:
        root = os.path.abspath(root)
        if not os.path.isdir(root):
            raise ValueError(
                f"--image_dir: {image_dir!r} is not a directory; pass a folder with one "
                "sub-folder of images per class"
            )
    elif root.endswith("/") and not root.endswith("://"):
        root = root.rstrip("/")
    prefix = root if root.endswith("/") else root + "/"

    entries: list[tuple[str, str]] = []
    for meta in _match(FileSystems.join(root, "**"), flag="--image_dir", shown=image_dir):
        path = os.path.abspath(meta.path) if is_local else meta.path
        if not path.startswith(prefix) or path.endswith("/"):
            continue  # a folder placeholder object, or the folder itself
        relative = path[len(prefix) :]
        if is_local and os.sep != "/":
            relative = relative.replace(os.sep, "/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        entries.append((relative, path))
    entries.sort()

    records: list[Row | ErrorRecord] = []
    num_rows = 0
    for relative, path in entries:
        parts = relative.split("/")
        if len(parts) == 2:
            records.append(Row(root, 0, relative, path, parts[0], None))
            num_rows += 1
            continue
        if len(parts) == 1:
            reason = (
                f"file {relative!r} is directly in --image_dir, not in a class sub-folder; "
                f"move it to {posixpath.join(root, '<label>', relative)!r}"
            )
        else:
            reason = (
                f"file {relative!r} is nested below the class folder {parts[0]!r}; images "
                "must sit directly in their class folder"
            )
        records.append(ErrorRecord(root, 0, relative, path, PARSE_STAGE, reason, BAD_ROW))
    if num_rows == 0:
        raise ValueError(
            f"--image_dir: {image_dir!r} does not exist or holds no file in a class sub-folder; "
            "expected one sub-folder per class, e.g. DIR/roses/1.jpg"
        )
    num_classes = len({row.label for row in records if isinstance(row, Row)})
    logger.info(
        "--image_dir %s: %d file(s) in %d class folder(s), %d rejected",
        root,
        num_rows,
        num_classes,
        len(records) - num_rows,
    )
    return iter(records)


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
    resolver: _UriResolver,
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
        raise _RowError(reason)
    values = dict(zip(columns, cells, strict=True))
    if not values[URI_COLUMN]:
        raise _RowError(f"empty {URI_COLUMN}")
    try:
        uri = resolver.resolve(values[URI_COLUMN])
    except ValueError as err:
        raise _RowError(str(err)) from err
    label = values.get(LABEL_COLUMN, "")
    if not label and require_label:
        raise _RowError(f"empty {LABEL_COLUMN} for {uri}", uri)
    split = values.get(SPLIT_COLUMN, "").lower() or None
    if split is not None and split not in SPLITS:
        raise _RowError(
            f"invalid {SPLIT_COLUMN} {values[SPLIT_COLUMN]!r}; expected one of "
            f"{', '.join(SPLITS)} (any case) or blank for the hashed split",
            uri,
        )
    return Row(source, line, raw, uri, label, split)


def _error(source: str, line: int, raw: str, uri: str, reason: str) -> ErrorRecord:
    return ErrorRecord(source, line, raw, uri, PARSE_STAGE, reason, BAD_ROW)


class _UriResolver:
    """Resolves the URIs of one CSV against the CSV's folder."""

    def __init__(self, source: str) -> None:
        self._source = _file_uri_to_path(source.strip())
        self._remote = FileSystems.get_scheme(self._source) is not None
        self._base: str | None = None

    def _base_dir(self) -> str:
        if self._base is None:
            try:
                self._base = FileSystems.split(self._source)[0]
            except ValueError:  # a scheme without a Beam filesystem here; no I/O is needed
                self._base = posixpath.dirname(self._source)
        return self._base

    def resolve(self, uri: str) -> str:
        """Returns ``uri`` made absolute; raises ValueError when it cannot be."""
        if FileSystems.get_scheme(uri) is not None:
            return _file_uri_to_path(uri)
        if os.path.isabs(uri):
            return uri
        if not self._remote:
            return os.path.abspath(os.path.join(self._base_dir(), uri))
        try:
            joined = FileSystems.join(self._base_dir(), uri)
        except ValueError:
            joined = posixpath.join(self._base_dir(), uri)
        return _normalize_dot_segments(joined, uri)


def _normalize_dot_segments(joined: str, relative: str) -> str:
    """Applies ``.`` / ``..`` segments of a relative URI joined onto ``scheme://bucket/dir``."""
    if not {".", ".."} & set(relative.split("/")):
        return joined
    scheme, _, rest = joined.partition("://")
    bucket, _, key = rest.partition("/")
    parts: list[str] = []
    for part in key.split("/"):
        if part == ".":
            continue
        if part == "..":
            if not parts:
                raise ValueError(
                    f"relative {URI_COLUMN} {relative!r} climbs above {scheme}://{bucket}"
                )
            parts.pop()
            continue
        parts.append(part)
    return f"{scheme}://{bucket}/{'/'.join(parts)}"


def _file_uri_to_path(uri: str) -> str:
    """Turns ``file:///a/b`` (or ``file://localhost/a/b``) into ``/a/b``; other values as-is."""
    if FileSystems.get_scheme(uri) != _FILE_SCHEME:
        return uri
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        return uri
    return urllib.request.url2pathname(parsed.path)


def _has_glob(path: str) -> bool:
    return any(char in _GLOB_CHARS for char in path)


def _match(pattern: str, flag: str, shown: str) -> list[FileMetadata]:
    """``FileSystems.match`` of one pattern; listing failures become a ValueError naming ``flag``."""
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except (BeamIOError, ValueError) as err:
        raise ValueError(f"{flag}: cannot list {shown!r}: {err}") from err


def _decode_error_reason(data: bytes, err: UnicodeDecodeError) -> str:
    valid_prefix = data[: err.start].decode("utf-8")
    line = len(io.StringIO(valid_prefix + "x", newline="").readlines())
    bad = data[err.start : err.start + 1].hex()
    return (
        f"file is not UTF-8 text (byte 0x{bad} at offset {err.start}, line {line}); "
        "save it as UTF-8; none of its rows were read"
    )
