"""Staged outputs: a run writes into ``<output_dir>/.hubflow-staging/`` and publishes at the end.

The previous outputs stay readable until the new ones are complete: a run that fails or is
killed before its outputs are complete leaves them as they were, and its staging folder is
removed by the next run (under the dir's lock, so it is never another live run's).
:func:`publish` then replaces the old outputs in an order that keeps the dir honest at every
step: the old completion marker (``manifest.json`` / ``summary.json``) goes first, the other old
outputs next, then the new outputs move in and the new marker moves last. A reader that finds
the marker finds a complete set. A run killed during that swap leaves a dir without a marker
until the next run, which finishes the swap (:func:`recover`) before it does anything else.

Only paths the caller's output layout names are deleted; files of the user's that happen to be
in the dir are never touched. Works on any TensorFlow filesystem (:mod:`storage.fileops`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence

import tensorflow as tf

from storage.fileops import basename, delete, join, move

_LOGGER = logging.getLogger(__name__)
STAGING_DIR = ".hubflow-staging"
PUBLISH_LIST = ".publish.json"  # in the staging folder: the names being published
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

    The names are first written to the staging folder (:data:`PUBLISH_LIST`); from then on a
    run killed mid-publish is finished by the next run (:func:`recover`), so the complete new
    set is never thrown away.

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
    with tf.io.gfile.GFile(join(staging, PUBLISH_LIST), "w") as f:
        f.write(json.dumps(sorted(new_outputs)))
    _finish(output_dir, sorted(new_outputs), old_outputs, marker)


def recover(output_dir: str, marker: str, existing: Callable[[str], list[str]]) -> bool:
    """Finishes a publish that a killed run had started.

    Call it holding the dir's lock, before looking at what the dir holds. Only a publish under
    way (:data:`PUBLISH_LIST` written) is finished: the old outputs may already be partly gone,
    and the staged set is complete. A staging folder whose run was killed before it began to
    publish leaves the old outputs whole; :func:`reset` discards it, as for any unfinished run.

    Args:
      existing: the paths of the job's outputs (and temp folders) present in a dir.

    Returns:
      True when a set was published.
    """
    listed = join(staging_dir(output_dir), PUBLISH_LIST)
    if not tf.io.gfile.exists(listed):
        return False
    with tf.io.gfile.GFile(listed) as f:
        new = json.loads(f.read())
    _LOGGER.warning("%s: finishing the publish of a run that was stopped during it", output_dir)
    _finish(output_dir, new, existing(output_dir), marker)
    return True


def _finish(output_dir: str, new: Sequence[str], old: Sequence[str], marker: str) -> None:
    """The publish steps; each is safe to repeat, so a killed publish can be run again."""
    staging = staging_dir(output_dir)
    if tf.io.gfile.exists(join(staging, marker)):  # else the marker, moved last, is in place
        delete(join(output_dir, marker))
        new_names = set(new)
        for path in old:  # old outputs the new set does not replace
            if basename(path) not in new_names:
                delete(path)
        for name in sorted(new_names - {marker}):
            if tf.io.gfile.exists(join(staging, name)):  # else moved in before a kill
                delete(join(output_dir, name))
                move(join(staging, name), join(output_dir, name))
        move(join(staging, marker), join(output_dir, marker))
    tf.io.gfile.rmtree(staging)
    _LOGGER.info("published %d outputs to %s", len(new), output_dir)
