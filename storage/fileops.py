"""Moving and deleting files and folders on any TensorFlow filesystem (local, ``gs://``, ``ram://``).

A local entry moves with one rename (atomic). On ``gs://`` a "folder" is a name prefix and
cannot be renamed at once, so folders move file by file (each a server-side copy and delete).
"""

from __future__ import annotations

import posixpath

import tensorflow as tf


def join(*parts: str) -> str:
    return posixpath.join(parts[0].rstrip("/"), *parts[1:])


def basename(path: str) -> str:
    """The last name of a path or URL (a folder's too, with or without its trailing slash)."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def delete(path: str) -> None:
    """Deletes a file or a folder with its contents; nothing there is fine."""
    if tf.io.gfile.isdir(path):
        tf.io.gfile.rmtree(path)
    elif tf.io.gfile.exists(path):
        tf.io.gfile.remove(path)


def move(source: str, target: str) -> None:
    """Moves a file or folder; a folder is merged into an existing ``target`` file by file."""
    folder = tf.io.gfile.isdir(source)
    if not folder or ("://" not in source and not tf.io.gfile.exists(target)):
        tf.io.gfile.rename(source, target, overwrite=not folder)
        return
    for root, _, names in tf.io.gfile.walk(source):
        relative = root[len(source.rstrip("/")) :].strip("/")
        destination = join(target, relative) if relative else target
        tf.io.gfile.makedirs(destination)
        for name in names:
            tf.io.gfile.rename(join(root, name), join(destination, name), overwrite=True)
    tf.io.gfile.rmtree(source)
