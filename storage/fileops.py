"""Moving and deleting files and folders on any TensorFlow filesystem (local, ``gs://``, ``ram://``).

A local entry moves with one rename (atomic). An object store (``gs://``, any ``scheme://``) has
no folders, only object names with a common prefix: a folder cannot be renamed at once (TF's GCS
filesystem renames a "folder" object by object, in name order, so ``saved_model.pb`` would land
before ``variables/``). There, folders move and are deleted file by file, in an order the caller
chooses for its completion markers (``first`` / ``last``): a reader that finds the marker finds
the whole folder.

Remote folders are listed with one glob per level (``folder/*``, ``folder/*/*``, ...), which
matches whole names on every filesystem, rather than with ``tf.io.gfile.walk``: on ``ram://``
listing ``assets`` also lists the entries of its sibling ``assets.extra``.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence

import tensorflow as tf


def join(*parts: str) -> str:
    return posixpath.join(parts[0].rstrip("/"), *parts[1:])


def basename(path: str) -> str:
    """The last name of a path or URL (a folder's too, with or without its trailing slash)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def is_remote(path: str) -> bool:
    """True for a URL (``gs://…``, ``ram://…``), False for a local path."""
    return "://" in path


def _glob_escape(path: str) -> str:
    """``path`` as a glob pattern that matches only itself (fnmatch escapes)."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


def _tree(folder: str) -> tuple[list[str], list[str]]:
    """The files and the sub-folders under ``folder``, at any depth, as sorted relative paths."""
    root = folder.rstrip("/")
    if not is_remote(root):
        files, folders = [], []
        for parent, subfolders, names in tf.io.gfile.walk(root):
            relative = parent[len(root) :].strip("/")
            files += [join(relative, n) if relative else n for n in names]
            folders += [join(relative, n) if relative else n for n in subfolders]
        return sorted(files), sorted(folders)
    pattern, found = _glob_escape(root), set()
    while True:
        pattern += "/*"
        level = {
            path.rstrip("/")[len(root) + 1 :]
            for path in tf.io.gfile.glob(pattern)
            if path.startswith(root + "/") and path.rstrip("/") != root
        }
        if not level - found:  # (a folder's marker object "name/" repeats "name")
            break
        found |= level
    parents = {posixpath.dirname(name) for name in found}
    folders = {name for name in found if name in parents or tf.io.gfile.isdir(join(root, name))}
    return sorted(found - folders), sorted(folders)


def list_files(folder: str) -> list[str]:
    """The files under ``folder`` at any depth, as sorted ``/``-separated relative paths."""
    return _tree(folder)[0]


def _ordered(names: Sequence[str], first: Sequence[str] = (), last: Sequence[str] = ()) -> list:
    """``names`` with those whose last name is in ``first`` at the front, ``last`` at the end."""

    def rank(name: str) -> int:
        leaf = basename(name)
        return 0 if leaf in first else 2 if leaf in last else 1

    return sorted(names, key=lambda name: (rank(name), name))


def delete(path: str, *, first: Sequence[str] = (), last: Sequence[str] = ()) -> None:
    """Deletes a file or a folder with its contents; nothing there is fine.

    On an object store a folder goes file by file: files named in ``first`` (a folder's
    completion markers, e.g. ``saved_model.pb``) go before the others, so a reader never finds
    a marker whose folder is half gone, and those in ``last`` (a marker saying "being deleted")
    after them. A local folder goes with one ``rmtree``.
    """
    if not tf.io.gfile.isdir(path):
        if tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
        return
    if not is_remote(path):
        tf.io.gfile.rmtree(path)
        return
    files, folders = _tree(path)
    for name in _ordered(files, first, last):
        tf.io.gfile.remove(join(path, name))
    # Deepest first, and a name before any name it is a prefix of ("assets.extra", "assets").
    for name in [*sorted(folders, reverse=True), ""]:
        folder = join(path, name) if name else path
        if tf.io.gfile.exists(folder):  # an object store's implicit folder goes with its files
            tf.io.gfile.rmtree(folder)


def move(source: str, target: str, *, first: Sequence[str] = (), last: Sequence[str] = ()) -> None:
    """Moves a file or folder; a folder is merged into an existing ``target`` file by file.

    When a folder moves file by file (on an object store, or into an existing local folder),
    files named in ``first`` move before the others and those in ``last`` after them: pass a
    folder's completion markers (``saved_model.pb``) as ``first`` when readers look in
    ``source``, as ``last`` when they look in ``target``.
    """
    folder = tf.io.gfile.isdir(source)
    if not folder or (not is_remote(source) and not tf.io.gfile.exists(target)):
        tf.io.gfile.rename(source, target, overwrite=not folder)
        return
    files, folders = _tree(source)
    for name in ["", *folders]:
        tf.io.gfile.makedirs(join(target, name) if name else target)
    for name in _ordered(files, first, last):
        tf.io.gfile.rename(join(source, name), join(target, name), overwrite=True)
    delete(source)
