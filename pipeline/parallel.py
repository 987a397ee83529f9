"""A DoFn base class that runs per-element CPU work on a bounded thread pool.

A Beam worker runs a fused stage one element at a time on the bundle's thread. In the image
pass that stage is read -> decode -> re-encode -> RunInference -> write: while the model runs,
no image is being decoded, and while images decode the model idles, so on a CPU worker half
the cores wait. Pillow, hashlib, zlib and TensorFlow release the GIL while they work, so a
few threads that decode the next images while the bundle thread runs the model keep every
core busy.

:class:`ThreadedDoFn` splits a DoFn into ``work`` (pure, thread-safe, runs on the pool) and
``emit`` (runs on the bundle thread and yields outputs, so Beam counters and tagged outputs
behave as in any DoFn). The pool is shared by the DoFn's instances in a worker process. At most
``max_in_flight`` elements per instance are queued or running at once,
which bounds memory; results are emitted in input order; each output keeps its input's window
and timestamp; an exception raised by ``work`` fails the bundle as it would without threads.

The scheduling itself (submit, emit finished results in order, block only when ``max_in_flight``
are pending) is :class:`InOrder`, which has no Beam in it; :func:`ordered_map` runs it over a
plain iterable, as the preprocessing benchmark's Beam-free loop does.

Beam's ``AsyncWrapper`` (``apache_beam.transforms.async_dofn``) targets slow remote calls in
streaming pipelines: it needs keyed input and keeps pending elements in state with real-time
timers, so it would serialize every decoded image; this class does not.
"""

from __future__ import annotations

import collections
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import apache_beam as beam
from apache_beam.pvalue import TaggedOutput
from apache_beam.utils.windowed_value import WindowedValue


def default_threads() -> int:
    """Pool size: the CPUs this process may use (at least 2, so work overlaps the bundle)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(2, cpus)


# One pool per DoFn class and size per process: a runner that runs many bundles at once in one
# process (Dataflow runs several per SDK process) shares the CPUs instead of multiplying threads.
_POOLS: dict[tuple[str, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _shared_pool(name: str, threads: int) -> ThreadPoolExecutor:
    with _POOLS_LOCK:
        pool = _POOLS.get((name, threads))
        if pool is None:
            pool = ThreadPoolExecutor(threads, thread_name_prefix=name)
            _POOLS[(name, threads)] = pool
        return pool


class InOrder:
    """Work submitted to a pool, handed back in submission order with at most ``limit`` pending.

    :meth:`submit` starts ``fn(element)`` and returns the ``(tag, result)`` pairs that are now
    ready: the oldest ones that have finished, and, while more than ``limit`` are pending, the
    oldest ones waited for. :meth:`drain` waits for the rest. ``tag`` is whatever the caller
    wants back with the result. An exception raised by ``fn`` is re-raised on the caller's thread.
    """

    def __init__(self, pool: ThreadPoolExecutor, limit: int):
        if limit < 1:
            raise ValueError(f"limit must be positive, got {limit}")
        self._pool = pool
        self._limit = limit
        self._pending: collections.deque[tuple[Any, Future]] = collections.deque()

    def submit(self, fn, element, tag: Any = None) -> Iterator[tuple[Any, Any]]:
        self._pending.append((tag, self._pool.submit(fn, element)))
        while self._pending and (len(self._pending) > self._limit or self._pending[0][1].done()):
            yield self._pop()

    def drain(self) -> Iterator[tuple[Any, Any]]:
        while self._pending:
            yield self._pop()

    def _pop(self) -> tuple[Any, Any]:
        tag, future = self._pending.popleft()
        return tag, future.result()


def ordered_map(fn, elements: Iterable, pool: ThreadPoolExecutor, limit: int) -> Iterator:
    """``fn`` over ``elements`` on ``pool``, results in input order, at most ``limit`` pending."""
    queue = InOrder(pool, limit)
    for element in elements:
        for _, result in queue.submit(fn, element):
            yield result
    for _, result in queue.drain():
        yield result


class ThreadedDoFn(beam.DoFn):
    """Runs :meth:`work` for several elements at once on a thread pool; :meth:`emit` outputs.

    Args:
      threads: pool size (default :func:`default_threads`).
      max_in_flight: most elements submitted but not yet emitted (default ``4 * threads``).
    """

    def __init__(self, threads: int | None = None, max_in_flight: int | None = None):
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be positive, got {threads}")
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be positive, got {max_in_flight}")
        self._threads = threads
        self._max_in_flight = max_in_flight
        self._pool: ThreadPoolExecutor | None = None
        self._queue: InOrder | None = None
        self._limit = 0

    def work(self, element: Any) -> Any:
        """The per-element work; runs on a pool thread. No outputs, no Beam metrics here."""
        raise NotImplementedError

    def emit(self, element: Any, result: Any) -> Iterable:
        """Yields the outputs of one element from its ``work`` result; runs on the bundle thread."""
        raise NotImplementedError

    def setup(self):
        threads = self._threads or default_threads()
        self._limit = self._max_in_flight or 4 * threads
        self._pool = _shared_pool(type(self).__name__, threads)

    def start_bundle(self):
        self._queue = InOrder(self._pool, self._limit)

    def process(
        self, element, window=beam.DoFn.WindowParam, timestamp=beam.DoFn.TimestampParam
    ) -> Iterator:
        # Emit what is finished (in order) and block only when the queue is full.
        for tag, result in self._queue.submit(self.work, element, (element, window, timestamp)):
            yield from self._emit(tag, result)

    def finish_bundle(self) -> Iterator:
        for tag, result in self._queue.drain():
            yield from self._emit(tag, result)

    def teardown(self):
        self._pool = None  # the pool is the process's, shared with other instances

    def _emit(self, tag, result) -> Iterator:
        element, window, timestamp = tag
        for output in self.emit(element, result):
            if isinstance(output, TaggedOutput):
                yield TaggedOutput(output.tag, WindowedValue(output.value, timestamp, (window,)))
            else:
                yield WindowedValue(output, timestamp, (window,))
