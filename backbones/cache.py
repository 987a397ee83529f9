"""The local cache of built-in backbones: ``$HUBFLOW_CACHE`` (default ``~/.cache/hubflow``).

A built-in backbone (``hubflow-builtin://<name>``) is built on first use by its preset's builder
(:mod:`backbones.registry`). The builder writes to a temp dir and renames it into place, so a
concurrent process (or Dataflow worker) never sees a half-written entry; when two build at once,
the first rename wins and both use it.
"""

from __future__ import annotations

import logging
import os

from backbones import registry
from schemas.backbones import builtin_name, is_builtin

_LOGGER = logging.getLogger(__name__)
# Bumped when a builder changes what it writes, so old entries are not reused.
CACHE_VERSION = "v1"


def cache_dir() -> str:
    """Where built-in backbones are built: ``$HUBFLOW_CACHE``, default ``~/.cache/hubflow``."""
    return os.environ.get("HUBFLOW_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "hubflow"
    )


def build_builtin(name: str, path: str) -> None:
    """Runs the preset's builder into ``path``."""
    build = registry.get(name).build
    if build is None:
        raise ValueError(f"--backbone: {name!r} is not a built-in backbone")
    build(path)


def local_handle(handle: str) -> str:
    """The handle ``hub.load`` / ``hub.KerasLayer`` should use: built-ins become cache paths."""
    if not is_builtin(handle):
        return handle
    name = builtin_name(handle)
    path = os.path.join(cache_dir(), f"{name}-{CACHE_VERSION}")
    if not os.path.isdir(path):
        _LOGGER.info("building the %s backbone into %s (first use only)", name, path)
        try:
            build_builtin(name, path)
        except (OSError, ValueError):
            if not os.path.isdir(path):  # not a lost race with another builder
                raise
    return path
