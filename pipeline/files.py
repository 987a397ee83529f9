"""Access to the jobs' inputs through Beam filesystems (local paths, ``gs://``, ``file://``).

Expanding ``--input_csv`` globs, listing an ``--image_dir`` (one sub-folder per class),
resolving a CSV's relative image URIs against the CSV's folder, and reading image bytes. Plain
Python over ``apache_beam.io.filesystems.FileSystems``; no Beam transforms.

Image files are untrusted input: :func:`read_image_bytes` reads only regular files (a FIFO
would block forever, a device file never ends) and at most ``max_bytes`` + 1 bytes, after a
stat that rejects bigger files unread.
"""

from __future__ import annotations

import logging
import os
import posixpath
import stat
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence

from apache_beam.io.filesystem import BeamIOError, CompressionTypes, FileMetadata
from apache_beam.io.filesystems import FileSystems

from pipeline.images import ImageError
from pipeline.records import Row
from schemas.csv_format import URI_COLUMN
from schemas.errors import (
    BAD_ROW,
    STAGE_PARSE,
    STAGE_READ,
    TOO_LARGE,
    UNREADABLE,
    ErrorRecord,
    exception_reason,
)

logger = logging.getLogger(__name__)

_FILE_SCHEME = "file"
_GLOB_CHARS = frozenset("*?[")
_READ_CHUNK = 8 << 20
_EOF_PROBE = 64 << 10
# Opening a FIFO for reading blocks until a writer appears unless O_NONBLOCK is set; O_NOCTTY
# keeps a terminal device from becoming the worker's controlling terminal.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
_FILE_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a named pipe (FIFO)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


class FileRejected(ImageError):
    """An image file refused unread: ``unreadable`` (not a regular file) or ``too_large``."""


def absolute(path: str) -> str:
    """A local path made absolute; a URL (``gs://`` …) as it is."""
    return path if "://" in path else os.path.abspath(path)


def check_max_bytes(max_bytes: int) -> int:
    """Returns ``max_bytes``; raises ValueError unless it is a positive number of bytes."""
    if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 1:
        raise ValueError(f"max_file_bytes must be a positive number of bytes, got {max_bytes!r}")
    return max_bytes


def match_paths(patterns: list[str]) -> list[str]:
    """Every path matching any of ``patterns`` (Beam filesystems; files only, as Beam lists)."""
    return [m.path for result in FileSystems.match(patterns) for m in result.metadata_list]


def read_image_bytes(uri: str, max_bytes: int) -> bytes:
    """The raw bytes of an image file (never decompressed by extension), read with a size cap.

    The file is stat'ed first: anything but a regular file, and a file of more than
    ``max_bytes`` bytes, is refused without being opened. Local files are opened non-blocking
    and checked again on the open descriptor (the path may have been replaced in between).
    Objects on remote Beam filesystems (``gs://`` …) are always regular; their size comes from
    the filesystem's metadata when it has it. At most ``max_bytes + 1`` bytes are read,
    so a file that grew after the stat (or whose size was unknown) is still refused.

    Raises:
      FileRejected: not a regular file (category ``unreadable``) or larger than ``max_bytes``
        (category ``too_large``).
      OSError / BeamIOError / ValueError: the file cannot be found, opened or read.
    """
    path = file_uri_to_path(uri)
    if FileSystems.get_scheme(path) is None:
        return _read_local(path, max_bytes)
    size = _remote_size(path)
    _check_size(size, max_bytes)
    with FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED) as f:
        data = _read_at_most(f.read, max_bytes + 1, size)
    _check_size(len(data), max_bytes, grew=True)
    return data


def read_row_image(row: Row, max_bytes: int) -> bytes | ErrorRecord:
    """:func:`read_image_bytes` of a row's image, or the row's error record (stage ``read``)."""
    try:
        return read_image_bytes(row.uri, max_bytes)
    except FileRejected as e:
        return ErrorRecord.for_row(row, STAGE_READ, e.category, e.reason)
    except Exception as e:  # noqa: BLE001 - any filesystem failure rejects this row
        return ErrorRecord.for_row(row, STAGE_READ, UNREADABLE, exception_reason(e))


def _read_local(path: str, max_bytes: int) -> bytes:
    _check_regular(os.stat(path).st_mode)  # never open a device or a FIFO
    fd = os.open(path, _OPEN_FLAGS)
    try:
        info = os.fstat(fd)
        _check_regular(info.st_mode)
        _check_size(info.st_size, max_bytes)
        data = _read_at_most(lambda n: os.read(fd, n), max_bytes + 1, info.st_size)
    finally:
        os.close(fd)
    _check_size(len(data), max_bytes, grew=True)
    return data


def _check_regular(mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    kind = next((name for test, name in _FILE_KINDS if test(mode)), "a special file")
    raise FileRejected(UNREADABLE, f"not a regular file ({kind}); only regular files are read")


def _check_size(size: int | None, max_bytes: int, grew: bool = False) -> None:
    if size is None or size <= max_bytes:
        return
    if grew:
        reason = f"the file grew past the limit of {max_bytes:,} bytes (--max_file_bytes)"
    else:
        reason = (
            f"file of {size:,} bytes exceeds the limit of {max_bytes:,} bytes "
            "(--max_file_bytes); it was not read"
        )
    raise FileRejected(TOO_LARGE, reason)


def _remote_size(path: str) -> int | None:
    """The size of a remote object, or None when its filesystem cannot tell.

    The filesystem's ``metadata`` is what ``FileSystems.match`` returns for a path without glob
    characters, without a separate existence check and without taking ``[`` as a glob.
    """
    try:
        return FileSystems.get_filesystem(path).metadata(path).size_in_bytes
    except Exception:  # noqa: BLE001 - the read that follows reports a missing object
        return None


def _read_at_most(read: Callable[[int], bytes], limit: int, size_hint: int | None) -> bytes:
    """Up to ``limit`` bytes from ``read`` (which may return short reads) until EOF.

    The first read asks for the expected size + 1, so an unchanged file takes one read and one
    small one that finds EOF; buffers never grow past ``limit``.
    """
    chunks: list[bytes] = []
    remaining = limit
    want = size_hint + 1 if size_hint is not None else _READ_CHUNK
    while remaining > 0:
        chunk = read(min(remaining, want))
        if not chunk:
            break
        chunks.append(chunk)
        remaining -= len(chunk)
        want = _READ_CHUNK if len(chunks) > 1 else _EOF_PROBE
    return b"".join(chunks)


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

    The folder is listed once, eagerly (local folders with ``os.walk``, others with
    ``FileSystems.match``), so a bad ``--image_dir`` raises when this is called, not when the
    result is iterated. Hidden entries (a file or folder name starting with ``'.'``, e.g.
    ``.DS_Store``) are skipped. Files directly in ``DIR`` and files nested below a class folder
    (``DIR/<label>/sub/<file>``) become ``ErrorRecord`` s with category :data:`~schemas.errors.BAD_ROW`. A local
    sub-folder that cannot be listed (no permission) becomes one ``ErrorRecord`` (category
    :data:`~schemas.errors.UNREADABLE`, ``row`` = its relative path with a trailing ``/``), so its files are
    counted as a rejected row instead of vanishing.

    Args:
      image_dir: the folder (local path, ``file://`` or a Beam filesystem URI).

    Returns:
      An iterator, sorted by path, of a ``Row`` per class file (``source`` = the folder,
      absolute for local; ``line`` 0; ``row`` = the path relative to the folder, ``/``-separated;
      ``label`` = the class folder's name; ``split`` None) and the error records above.

    Raises:
      ValueError: naming ``--image_dir`` when the folder does not exist, cannot be listed or
        holds no readable file in a class sub-folder.
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
        paths, unreadable = _walk_local(root)
        if root in unreadable:
            raise ValueError(
                f"--image_dir: cannot list {image_dir!r}: {exception_reason(unreadable[root])}"
            )
    else:
        if root.endswith("/") and not root.endswith("://"):
            root = root.rstrip("/")
        listed = match(FileSystems.join(root, "**"), flag="--image_dir", shown=image_dir)
        paths, unreadable = [meta.path for meta in listed], {}
    prefix = root if root.endswith("/") else root + "/"

    entries: list[tuple[str, str, OSError | None]] = []
    for path in paths:
        if not path.startswith(prefix) or path.endswith("/"):
            continue  # a folder placeholder object, or the folder itself
        relative = path[len(prefix) :]
        if is_local and os.sep != "/":
            relative = relative.replace(os.sep, "/")
        if any(part.startswith(".") for part in relative.split("/")):
            continue
        entries.append((relative, path, None))
    for folder, error in unreadable.items():
        relative = os.path.relpath(folder, root).replace(os.sep, "/") + "/"
        entries.append((relative, folder, error))
    entries.sort(key=lambda entry: entry[0])

    records: list[Row | ErrorRecord] = []
    num_rows = 0
    for relative, path, error in entries:
        parts = relative.split("/")
        if error is not None:
            reason = (
                f"cannot list folder {path!r}: {exception_reason(error)}; no file in it was read"
            )
            records.append(ErrorRecord(root, 0, relative, "", STAGE_PARSE, reason, UNREADABLE))
            continue
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
    if num_rows == 0 and unreadable:
        first = min(unreadable)
        raise ValueError(
            f"--image_dir: {image_dir!r} holds no readable file in a class sub-folder; "
            f"cannot list {len(unreadable)} folder(s), e.g. {first!r}: "
            f"{exception_reason(unreadable[first])}"
        )
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


def _walk_local(root: str) -> tuple[list[str], dict[str, OSError]]:
    """The non-hidden files below a local ``root`` and the folders that could not be listed.

    ``FileSystems.match`` also walks local folders with ``os.walk``, but skips a folder it
    cannot list without a word; this walk records the error of each such folder.
    """
    paths: list[str] = []
    unreadable: dict[str, OSError] = {}

    def on_error(error: OSError) -> None:
        unreadable[os.path.abspath(error.filename or root)] = error

    for folder, subfolders, names in os.walk(root, onerror=on_error):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        paths += [os.path.join(folder, name) for name in names if not name.startswith(".")]
    return paths, unreadable


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
