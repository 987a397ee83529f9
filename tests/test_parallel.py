"""ThreadedDoFn: work on a pool, outputs in order with their windows, bounded, failures surface."""

from __future__ import annotations

import threading
import time

import apache_beam as beam
import pytest
from apache_beam.pvalue import TaggedOutput
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from apache_beam.transforms import window
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP

from pipeline.parallel import ThreadedDoFn


class _Square(ThreadedDoFn):
    """Squares numbers on the pool; odd results also go to the ``odd`` output."""

    def work(self, x):
        time.sleep(0.001 * (x % 3))  # finish out of order
        return x * x, threading.current_thread().name

    def emit(self, x, result):
        square, thread = result
        yield square
        if square % 2:
            yield TaggedOutput("odd", (x, thread))


def test_every_element_is_emitted_once_with_tagged_outputs():
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        out = (
            p
            | beam.Create(list(range(200)))
            | beam.ParDo(_Square(threads=3, max_in_flight=5)).with_outputs("odd", main="main")
        )
        assert_that(out.main, equal_to([x * x for x in range(200)]), label="main")
        assert_that(
            out.odd | beam.Map(lambda xt: xt[0]),
            equal_to([x for x in range(200) if x % 2]),
            label="odd",
        )
        # The work ran on the pool, not on the bundle thread.
        assert_that(
            out.odd | beam.Map(lambda xt: xt[1].startswith("_Square")) | beam.Distinct(),
            equal_to([True]),
            label="threads",
        )


def test_outputs_keep_their_input_window_and_timestamp():
    with TestPipeline(runner="BundleBasedDirectRunner") as p:
        sums = (
            p
            | beam.Create([(1, 5), (2, 5), (3, 15), (4, 15), (5, 25)])
            | beam.MapTuple(lambda x, t: window.TimestampedValue(x, t))
            | beam.WindowInto(window.FixedWindows(10))
            | beam.ParDo(_Square(threads=2, max_in_flight=2))
            | beam.CombineGlobally(sum).without_defaults()
        )
        assert_that(sums, equal_to([1 + 4, 9 + 16, 25]))


class _Recorder(_Square):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.started: list[int] = []
        self.emitted: list[int] = []

    def work(self, x):
        self.started.append(x)
        return super().work(x)

    def emit(self, x, result):
        self.emitted.append(x)
        # When x is emitted, nothing beyond the in-flight window may have been started.
        assert max(self.started) < x + 1 + 4, (x, max(self.started))
        yield from super().emit(x, result)


def test_in_input_order_and_bounded_in_flight():
    fn = _Recorder(threads=2, max_in_flight=4)
    fn.setup()
    fn.start_bundle()
    outputs = []
    for x in range(50):
        outputs += list(fn.process(x, window=GlobalWindow(), timestamp=MIN_TIMESTAMP))
    outputs += list(fn.finish_bundle())
    fn.teardown()
    assert fn.emitted == list(range(50))
    main = [o.value for o in outputs if not isinstance(o, TaggedOutput)]
    assert all(o.windows == (GlobalWindow(),) for o in outputs if not isinstance(o, TaggedOutput))
    assert main == [x * x for x in range(50)]


class _Boom(ThreadedDoFn):
    def work(self, x):
        if x == 7:
            raise ValueError("bad element 7")
        return x

    def emit(self, x, result):
        yield result


def test_an_exception_in_work_fails_the_bundle():
    with pytest.raises(Exception, match="bad element 7"):
        with TestPipeline(runner="BundleBasedDirectRunner") as p:
            _ = p | beam.Create(list(range(20))) | beam.ParDo(_Boom(threads=2))


def test_rejects_bad_pool_sizes():
    with pytest.raises(ValueError, match="threads"):
        _Boom(threads=0)
    with pytest.raises(ValueError, match="max_in_flight"):
        _Boom(max_in_flight=0)


def test_ordered_map_keeps_order_and_bounds_pending_work():
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.parallel import ordered_map

    running, peak, lock = [0], [0], threading.Lock()

    def slow_square(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.002 * (x % 4))  # finish out of order
        with lock:
            running[0] -= 1
        return x * x

    with ThreadPoolExecutor(8) as pool:
        assert list(ordered_map(slow_square, range(100), pool, limit=3)) == [
            x * x for x in range(100)
        ]
    assert peak[0] <= 4  # at most `limit` waiting plus the one just submitted


def test_ordered_map_reraises_a_failure_of_the_work():
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.parallel import ordered_map

    def fail_on_seven(x):
        if x == 7:
            raise ValueError("seven")
        return x

    with ThreadPoolExecutor(2) as pool, pytest.raises(ValueError, match="seven"):
        list(ordered_map(fail_on_seven, range(20), pool, limit=4))
