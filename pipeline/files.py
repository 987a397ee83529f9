"""Access to the jobs' inputs through Beam filesystems (local paths, ``gs://``, ``file://``).

Expanding ``--input_csv`` globs, listing an ``--image_dir`` (one sub-folder per class),
resolving a CSV's relative image URIs against the CSV's folder, and reading image bytes. Plain
Python over ``apache_beam.io.filesystems.FileSystems``; no Beam transforms.
"""

from __future__ import annotations

import logging
import os
import posixpath
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from pipeline.records import Row
from schemas.csv_format import URI_COLUMN
from schemas.errors import BAD_ROW, STAGE_PARSE, ErrorRecord

logger = logging.getLogger(__name__)

_FILE_SCHEME = "file"
_GLOB_CHARS = frozenset("*?[")


def absolute(path: str) -> str:
    """A local path made absolute; a URL (``gs://`` …) as it is."""
    return path if "://" in path else os.path.abspath(path)


def read_image_bytes(uri: str) -> bytes:
    """The raw bytes of an image file (never decompressed by extension)."""
    with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        return f.read()


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
        path = file_uri_to_path(pattern)
        is_local = FileSystems.get_scheme(path) is None
        if is_local:
            path = os.path.abspath(path)  # Beam's local match cannot list a relative glob
        if is_local and not has_glob(path) and os.path.isdir(path):
            raise ValueError(
                f"--input_csv: {pattern!r} is a directory; pass a CSV file or a glob such as "
                f"{posixpath.join(pattern, '*.csv')!r}"
            )
        matched = [meta.path for meta in match(path, flag="--input_csv", shown=pattern)]
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
    root = file_uri_to_path(image_dir.strip())
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
    for meta in match(FileSystems.join(root, "**"), flag="--image_dir", shown=image_dir):
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
        records.append(ErrorRecord(root, 0, relative, path, STAGE_PARSE, reason, BAD_ROW))
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


class UriResolver:
    """Resolves the URIs of one CSV against the CSV's folder."""

    def __init__(self, source: str) -> None:
        self._source = file_uri_to_path(source.strip())
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
            return file_uri_to_path(uri)
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


def file_uri_to_path(uri: str) -> str:
    """Turns ``file:///a/b`` (or ``file://localhost/a/b``) into ``/a/b``; other values as-is."""
    if FileSystems.get_scheme(uri) != _FILE_SCHEME:
        return uri
    parsed = urllib.parse.urlparse(uri)
    if parsed.netloc not in ("", "localhost"):
        return uri
    return urllib.request.url2pathname(parsed.path)


def has_glob(path: str) -> bool:
    return any(char in _GLOB_CHARS for char in path)


def match(pattern: str, flag: str, shown: str) -> list[FileMetadata]:
    """``FileSystems.match`` of one pattern; listing failures become a ValueError naming ``flag``."""
    try:
        return FileSystems.match([pattern])[0].metadata_list
    except (BeamIOError, ValueError) as err:
        raise ValueError(f"{flag}: cannot list {shown!r}: {err}") from err
