"""Content-addressed copies of local folders where remote workers can read them.

A Dataflow worker cannot see the launcher's disk, so a backbone built or stored locally (or a
local export, for batch prediction) is copied once under the job's ``--temp_location`` and the
workers load the copy. The copy's name holds the folder's sha256, so a second job with the same
folder reuses it, and a changed folder never reuses a stale copy. The copy is complete once its
marker file exists; the marker is written last, so a copy interrupted half-way is redone.
"""

from __future__ import annotations

import hashlib
import os
import posixpath

import tensorflow as tf

STAGED_FOLDER = "hubflow-staged"
COMPLETE_MARKER = ".hubflow-complete"
_CHUNK = 1 << 20


def _files(local_dir: str) -> list[str]:
    """The folder's files, as sorted ``/``-separated paths relative to it."""
    found = []
    for root, dirs, names in os.walk(local_dir):
        dirs.sort()
        for name in names:
            found.append(os.path.relpath(os.path.join(root, name), local_dir).replace(os.sep, "/"))
    return sorted(found)


def tree_digest(local_dir: str) -> str:
    """sha256 over a folder's relative file paths and contents (not their times or modes, nor
    the marker of a staged copy, so a complete copy has its source's digest)."""
    digest = hashlib.sha256()
    for relative in _files(local_dir):
        if relative == COMPLETE_MARKER:
            continue
        digest.update(relative.encode("utf-8") + b"\0")
        with open(os.path.join(local_dir, relative), "rb") as f:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
        digest.update(b"\0")
    return digest.hexdigest()


def staged_path(local_dir: str, temp_location: str, kind: str) -> str:
    """Where :func:`stage` puts ``local_dir``: ``<temp_location>/hubflow-staged/<kind>-<sha256>``."""
    root = temp_location.rstrip("/")
    return posixpath.join(root, STAGED_FOLDER, f"{kind}-{tree_digest(local_dir)}")


def is_staged(target: str) -> bool:
    return tf.io.gfile.exists(posixpath.join(target, COMPLETE_MARKER))


def stage(local_dir: str, temp_location: str, kind: str) -> tuple[str, bool]:
    """Copies ``local_dir`` under ``temp_location`` unless an identical copy is there.

    Args:
      local_dir: a local folder (a SavedModel).
      temp_location: any TensorFlow filesystem folder (``gs://…``, or a local one in tests).
      kind: the first part of the copy's name (``backbone``, ``model``).

    Returns:
      The copy's path and whether it was copied now (False: an earlier job's copy was reused).
    """
    target = staged_path(local_dir, temp_location, kind)
    if is_staged(target):
        return target, False
    for relative in _files(local_dir):
        destination = posixpath.join(target, relative)
        tf.io.gfile.makedirs(posixpath.dirname(destination))
        tf.io.gfile.copy(os.path.join(local_dir, relative), destination, overwrite=True)
    with tf.io.gfile.GFile(posixpath.join(target, COMPLETE_MARKER), "w") as f:
        f.write(os.path.basename(local_dir.rstrip(os.sep)) + "\n")
    return target, True
