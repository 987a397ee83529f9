"""The local cache of built-in backbones: ``$HUBFLOW_CACHE`` (default ``~/.cache/hubflow``).

A built-in backbone (``hubflow-builtin://<name>``) is built on first use by its preset's builder
(:mod:`backbones.registry`) into the entry ``<cache>/<name>-<CACHE_VERSION>``. The builder writes
to a temp dir and renames it into place, so a killed builder never exposes a half-written entry.
Builds of one entry are serialised by an exclusive ``flock`` on ``<cache>/.<entry>.lock``: when
two processes (or a Dataflow worker's SDK processes) need the entry at once, the first builds it
and the others wait, then use it. Entries derived from a backbone (its TFLite conversion,
:mod:`backbones.tflite_runtime`; the record of its probe, :func:`backbones.hub.describe`) are
built and checked the same way (:func:`build_once`), keyed by the backbone's content digest.

What is verified before an entry is loaded. After a successful build the entry is made
read-only for group and others and its digest (:func:`entry_digest`: SHA-256 over every file's
relative path and contents) is written atomically to a record *beside* it,
``<cache>/<entry>.sha256``, so a model directory copied or planted into the cache never brings
its own record. Before :func:`local_handle` returns an entry:

* the cache dir, the entry with every file and directory in it, and the record must be owned
  by this user (``os.geteuid()``) and not writable by group or others. Otherwise it raises
  :class:`UntrustedCacheError`, one line naming ``--backbone``, the path and what to do; it
  deletes nothing it did not make.
* the entry may hold only regular files and directories, and its digest must equal the record.
  An entry without a record (built by a hubflow older than the record, planted, or left by a
  builder killed between its rename and its record) or with a different digest (tampered,
  corrupted, partially copied) is never loaded: it is deleted and rebuilt, with a warning.

Threat model: this stops other users from planting or altering a cached backbone, and catches
accidental corruption and partial copies. It does not stop the same user (or root), who can
rewrite an entry and its record alike; it does not check the directories above the cache dir,
nor the moment between this check and TensorFlow reading the files. Hashing the ~15 MB
EfficientNet-Lite0 entry takes ~12 ms when the files are in the page cache (~50 ms cold), small
next to loading the SavedModel, so every load verifies.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator

from backbones import registry
from schemas.backbones import builtin_name, concat_parts, is_builtin, is_concat

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: builds are not serialised
    fcntl = None

_LOGGER = logging.getLogger(__name__)
# Bumped when a builder changes what it writes, so old entries are not reused.
CACHE_VERSION = "v1"
RECORD_SUFFIX = ".sha256"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)


class UntrustedCacheError(ValueError):
    """A cache dir, entry or record that another user owns or could have written: refused."""


def cache_dir() -> str:
    """Where built-in backbones are built: ``$HUBFLOW_CACHE``, default ``~/.cache/hubflow``."""
    return os.environ.get("HUBFLOW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hubflow"
    )


def record_path(entry: str) -> str:
    """The digest record of ``entry``: a sidecar file next to it in the cache dir."""
    return entry + RECORD_SUFFIX


def build_builtin(name: str, path: str) -> None:
    """Runs the preset's builder, which writes a temp dir and renames it to ``path``."""
    build = registry.get(name).build
    if build is None:
        raise ValueError(f"--backbone: {name!r} is not a built-in backbone")
    build(path)


def entry_digest(entry: str) -> str:
    """SHA-256 over the entry's directories and files: relative paths and contents, sorted.

    Raises:
      _Stale: the entry holds something other than regular files and directories.
    """
    outer = hashlib.sha256()
    for rel, full, st in _tree(entry):
        if stat.S_ISDIR(st.st_mode):
            outer.update(b"d\0" + rel.encode() + b"\0")
        elif stat.S_ISREG(st.st_mode):
            fd = os.open(full, os.O_RDONLY | _NOFOLLOW)
            with os.fdopen(fd, "rb") as f:
                inner = hashlib.file_digest(f, "sha256").digest()
            outer.update(b"f\0" + rel.encode() + b"\0" + inner)
        else:
            raise _Stale(f"{full} is not a regular file or directory")
    return outer.hexdigest()


def record(entry: str) -> str:
    """Seals a freshly built entry: clears group/other write bits, writes its digest record.

    Returns:
      The digest.
    """
    for _, full, st in _tree(entry):
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
            os.chmod(full, stat.S_IMODE(st.st_mode) & ~0o022)
    digest = entry_digest(entry)
    _write_record(entry, digest)
    return digest


def local_handle(handle: str) -> str:
    """The handle ``hub.load`` / ``hub.KerasLayer`` should use: built-ins and composites
    (``--backbone a,b``, :mod:`backbones.composite`) become cache paths.

    A built-in is built on first use, and verified (ownership, permissions, digest) on every
    use; an entry without a matching record is rebuilt. Other handles are returned unchanged.

    Raises:
      UntrustedCacheError: the cache dir, the entry or its record is owned by another user or
        writable by group or others.
      OSError, ValueError: the build failed.
    """
    if is_concat(handle):
        from backbones import composite  # it builds on this module

        return composite.local_path(handle)
    if not is_builtin(handle):
        return handle
    name = builtin_name(handle)
    return build_once(
        f"{name}-{CACHE_VERSION}", lambda path: build_builtin(name, path), f"{name} backbone"
    )


def save_into_place(model, path: str, files: dict[str, str] | None = None) -> str:
    """Saves ``model`` with ``tf.saved_model.save``, plus ``files`` (name -> text) beside its
    files, to a temp dir next to ``path`` and renames it to ``path``, so ``path`` never holds a
    partial model: what a builder of :func:`build_once` must do.

    Raises:
      ValueError: ``path`` already exists.
    """
    import tensorflow as tf

    path = os.path.abspath(path)
    if os.path.exists(path):
        raise ValueError(f"{path} already exists; remove it or choose another directory")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        tf.saved_model.save(model, tmp)
        for name, text in (files or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def build_once(
    entry_name: str,
    build: Callable[[str], object],
    what: str,
    subdir: str = "",
    check: Callable[[str], str | None] | None = None,
) -> str:
    """The cache entry ``<cache>[/<subdir>]/<entry_name>``, built on first use, verified on each.

    ``build(path)`` must write a temp dir beside ``path`` and rename it into place. Builds of one
    entry are serialised (see the module docstring); an entry that fails verification is deleted
    and built again, with a warning. Derived entries (a backbone's TFLite conversion, its probe
    record) use this too, so they get the same ownership, permission and digest checks.

    ``check(path)``, when given, reads a verified entry and says why it cannot be used (None if
    it can): the digest only proves the files are the ones recorded, not that what was recorded
    is readable by this version (an entry sealed by a buggy or older writer). Such an entry is
    deleted and rebuilt like a corrupted one.

    Raises:
      UntrustedCacheError: as :func:`local_handle`.
      OSError, ValueError: the build failed.
    """
    root = _private_cache_dir()
    if subdir:
        root = os.path.join(root, subdir)
        os.makedirs(root, mode=0o700, exist_ok=True)
        problem = _foreign(os.stat(root))
        if problem:
            raise UntrustedCacheError(
                f"--backbone: the cache folder {root} is {problem}; delete it and rerun"
            )
    path = os.path.join(root, entry_name)
    with _locked(path):
        reason = _verify(path)
        if reason is None and check is not None:
            reason = check(path)
        if reason is None:
            return path
        if os.path.lexists(path) or os.path.lexists(record_path(path)):
            _LOGGER.warning("not loading the cached %s: %s; rebuilding it", what, reason)
            _discard(path)
        _LOGGER.info("building the %s into %s (first use only)", what, path)
        try:
            build(path)
        except (OSError, ValueError):
            # A builder the lock does not reach (no flock on this file system) renamed its
            # entry in first: use it once that builder has recorded it.
            if not os.path.isdir(path) or _verify(path) is not None:
                raise
            return path
        record(path)
        reason = _verify(path)
        if reason is None and check is not None:
            reason = check(path)
        if reason is not None:
            raise ValueError(f"--backbone: the {what} just built in {path}: {reason}")
    return path


def prune_orphans(folder: str, record_file: str) -> list[str]:
    """Deletes the derived entries in ``folder`` made from local SavedModels that no longer exist
    (a rebuilt or deleted model, a test's temp backbone); returns their paths. Run after a build.

    Each entry names its source in ``<entry>/<record_file>``, a JSON object with
    ``backbone.handle`` (a composite's: gone when one of its parts is); entries without a
    readable one are left alone.
    """
    pruned = []
    for name in sorted(os.listdir(folder)):
        entry = os.path.join(folder, name)
        try:
            with open(os.path.join(entry, record_file), encoding="utf-8") as f:
                handle = json.load(f)["backbone"]["handle"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        handles = concat_parts(handle) if is_concat(handle) else [handle]
        if all("://" in h or os.path.exists(h) for h in handles):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(record_path(entry))  # no longer valid from here on
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(folder, f".{name}.lock"))
        pruned.append(entry)
    if pruned:
        _LOGGER.info("removed %d cache entries of backbones that are gone", len(pruned))
    return pruned


# ---------------------------------------------------------------------------------------------
# Checks


class _Stale(Exception):
    """The entry is ours but not what we recorded (or not recorded): rebuild it."""


def _private_cache_dir() -> str:
    root = os.path.abspath(cache_dir())
    os.makedirs(root, mode=0o700, exist_ok=True)
    st = os.stat(root)
    problem = _foreign(st)
    if problem:
        raise UntrustedCacheError(
            f"--backbone: the backbone cache {root} is {problem}; set HUBFLOW_CACHE to a "
            f"directory only you can write (or run chmod go-w {root} if it is yours)"
        )
    return root


def _foreign(st: os.stat_result) -> str | None:
    """Why another user could have written this file, or None."""
    if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
        return f"owned by uid {st.st_uid}, not by you (uid {os.geteuid()})"
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & 0o022:
        return f"writable by group or others (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def _tree(entry: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """``(relative path, path, lstat)`` of the entry and everything in it, sorted; no links."""
    st = os.lstat(entry)
    yield ".", entry, st
    if not stat.S_ISDIR(st.st_mode):
        return
    for name in sorted(os.listdir(entry)):
        full = os.path.join(entry, name)
        for rel, sub, sub_st in _tree(full):
            yield (name if rel == "." else f"{name}/{rel}"), sub, sub_st


def _verify(entry: str) -> str | None:
    """None when ``entry`` may be loaded, else why it must be (re)built.

    Raises:
      UntrustedCacheError: another user owns or could have written the entry or its record.
    """
    if not os.path.lexists(entry):
        return "not built yet"
    rec = record_path(entry)
    checked = list(_tree(entry))
    if os.path.lexists(rec):
        checked.append((rec, rec, os.lstat(rec)))
    for _, full, st in checked:
        problem = _foreign(st)
        if problem:
            raise UntrustedCacheError(
                f"--backbone: will not load the cached backbone {entry}: {full} is {problem}; "
                f"delete it (rm -rf {entry} {rec}) and rerun to rebuild it"
            )
    if not stat.S_ISDIR(checked[0][2].st_mode):
        return f"{entry} is not a directory"
    expected = _read_record(rec)
    if expected is None:
        return f"{entry} has no valid digest record {rec} (built by an older hubflow, or not here)"
    try:
        actual = entry_digest(entry)
    except _Stale as e:
        return str(e)
    if actual != expected:
        return f"the files in {entry} differ from the digest recorded when it was built"
    return None


def _read_record(rec: str) -> str | None:
    try:
        fd = os.open(rec, os.O_RDONLY | _NOFOLLOW)
    except OSError:
        return None
    with os.fdopen(fd) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
        try:
            digest = json.load(f).get("sha256")
        except (ValueError, AttributeError):
            return None
    return digest if isinstance(digest, str) else None


# ---------------------------------------------------------------------------------------------
# Writes


def _write_record(entry: str, digest: str) -> None:
    parent, base = os.path.split(entry)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}{RECORD_SUFFIX}.tmp-", dir=parent)  # mode 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump({"entry": base, "sha256": digest}, f)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, record_path(entry))
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _discard(entry: str) -> None:
    """Removes an entry that failed verification: the record first, then the entry."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(record_path(entry))
    if not os.path.lexists(entry):
        return
    if os.path.islink(entry) or not os.path.isdir(entry):
        os.unlink(entry)
        return
    parent, base = os.path.split(entry)
    aside = tempfile.mkdtemp(prefix=f".{base}.stale-", dir=parent)
    os.replace(entry, aside)  # atomic: the entry name is free at once
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def _locked(entry: str) -> Iterator[None]:
    """Holds an exclusive ``flock`` for ``entry`` (released by the kernel if the process dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    parent, base = os.path.split(entry)
    fd = os.open(os.path.join(parent, f".{base}.lock"), os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
