"""Staged outputs: a run writes into ``<output_dir>/.hubflow-staging/`` and publishes at the end.

The previous outputs stay readable until the new ones are complete: a run that fails or is
killed leaves them as they were, and its staging folder is removed by the next run (under the
dir's lock, so it is never another live run's). :func:`publish` then replaces the old outputs
in an order that keeps the dir honest at every step: the old completion marker (``manifest.json``
/ ``summary.json``) goes first, the other old outputs next, then the new outputs move in and the
new marker moves last. A reader that finds the marker finds a complete set.

Only paths the caller's output layout names are deleted; files of the user's that happen to be
in the dir are never touched. Works on any TensorFlow filesystem (:mod:`storage.fileops`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import tensorflow as tf

from storage.fileops import delete, join, move

_LOGGER = logging.getLogger(__name__)
STAGING_DIR = ".hubflow-staging"
# The folders Beam's file sinks write into next to their outputs (``beam-temp-<prefix>-<uuid>``);
# a killed run leaves them behind.
BEAM_TEMP_PATTERN = "beam-temp-*"


def temp_folders(output_dir: str) -> list[str]:
    """The Beam writers' temp folders in ``output_dir`` (Beam's own match lists files only)."""
    return tf.io.gfile.glob(join(output_dir, BEAM_TEMP_PATTERN))


def staging_dir(output_dir: str) -> str:
    """Where a run of the job writes before :func:`publish`."""
    return join(output_dir, STAGING_DIR)


def reset(output_dir: str) -> str:
    """Removes a killed run's staging folder and creates an empty one; returns its path."""
    path = staging_dir(output_dir)
    if tf.io.gfile.exists(path):
        _LOGGER.info("removing %s, left by an earlier run that did not finish", path)
        tf.io.gfile.rmtree(path)
    tf.io.gfile.makedirs(path)
    return path


def publish(
    output_dir: str,
    new_outputs: Sequence[str],
    old_outputs: Sequence[str],
    marker: str,
) -> None:
    """Replaces ``old_outputs`` in ``output_dir`` with ``new_outputs`` from the staging folder.

    Args:
      output_dir: the job's output dir.
      new_outputs: names (relative to the staging folder) of the new outputs, ``marker`` among
        them; everything else in the staging folder (temp files) is deleted with it.
      old_outputs: full paths of the previous run's outputs, as the job's layout lists them.
      marker: the name whose presence says "this set is complete" (deleted first, moved last).
    """
    staging = staging_dir(output_dir)
    if marker not in new_outputs:
        raise RuntimeError(f"{staging} holds no {marker}: the run did not complete")
    old_marker = join(output_dir, marker)
    delete(old_marker)
    for path in old_outputs:
        if path.rstrip("/") != old_marker:
            delete(path)
    for name in sorted(set(new_outputs) - {marker}):
        move(join(staging, name), join(output_dir, name))
    move(join(staging, marker), old_marker)
    tf.io.gfile.rmtree(staging)
    _LOGGER.info("published %d outputs to %s", len(new_outputs), output_dir)
