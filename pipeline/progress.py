"""Periodic progress lines from inside DoFns, so long local runs never look hung.

Each worker process logs its own share: items done, of how many, items per second and an ETA.
On the DirectRunner's default in-process mode that is the whole job.
"""

from __future__ import annotations

import logging
import os
import time

_LOGGER = logging.getLogger(__name__)


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


class Progress:
    """Counts items and logs a progress line at most every ``interval`` seconds."""

    def __init__(self, what: str, interval: float = 10.0):
        self._what = what
        self._interval = interval
        self._count = 0
        self._start = None
        self._last = 0.0

    def update(self, n: int = 1, total: int | None = None) -> None:
        now = time.monotonic()
        if self._start is None:
            self._start = self._last = now
            _LOGGER.info(
                "%s: started%s [pid %d]",
                self._what,
                f", {total} to do" if total else "",
                os.getpid(),
            )
        self._count += n
        if now - self._last < self._interval:
            return
        self._last = now
        rate = self._count / max(now - self._start, 1e-9)
        if total:
            left = max(total - self._count, 0)
            _LOGGER.info(
                "%s: %d of %d (%.0f%%), %.1f/s, ETA %s [pid %d]",
                self._what,
                self._count,
                total,
                100.0 * self._count / total,
                rate,
                format_seconds(left / rate if rate else 0),
                os.getpid(),
            )
        else:
            _LOGGER.info("%s: %d, %.1f/s [pid %d]", self._what, self._count, rate, os.getpid())
