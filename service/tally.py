"""Counters and histograms added to per call, kept as plain ints and handed to Prometheus when it reads them.

A prometheus_client `inc()` takes a lock and checks its metric each time (about 1 µs); a short call did nine of them
(runs by outcome, active runs up and down, tokens in and out, events sent by kind), and a histogram's `observe()`
takes two locks and walks its buckets in Python (about 0.75 µs; two per call). `add` is a dict update on the event
loop's thread instead, `Histogram.observe` a bisect and two adds, and `flush` passes what was added since the last
flush to the metrics: at every scrape of this process's registry (a collector registered before the service's
metrics, so that they are read after it) and at exit. Only the loop's thread writes the tallies, and flushes (any
thread, one at a time) only read them, so no count is lost to a race.

Under `--workers N` a scrape reads the workers' files, not their registries: there `add` and `histogram(...)`'s
`observe` write through at once, as before, so that a scrape sees every worker's counts; and a gauge read by a
function at each scrape (`observe`) is written to the worker's file every second instead (`keep_observed`).
"""

from __future__ import annotations

import asyncio
import atexit
import bisect
import os
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from prometheus_client import REGISTRY
from prometheus_client.metrics_core import Metric

Key = tuple[Any, ...]  # (metric, *labels)

_added: dict[Key, float] = {}
_flushed: dict[Key, float] = {}
_lock = threading.Lock()


def _through(key: Key, n: float = 1) -> None:
    metric, *labels = key
    (metric.labels(*labels) if labels else metric).inc(n)


def _tally(key: Key, n: float = 1) -> None:
    _added[key] = _added.get(key, 0) + n


# decided once: prometheus_client reads the same variable at import to choose its value store
_WRITE_THROUGH = "PROMETHEUS_MULTIPROC_DIR" in os.environ


def multiprocess() -> bool:
    """Whether metrics go to the workers' shared folder (`--workers N`), where a scrape reads their files."""
    return _WRITE_THROUGH


add = _through if _WRITE_THROUGH else _tally
"""`add(key, n)`: count `n` on `key`'s metric, `(metric, *label values)`; a Gauge's count may be negative."""


_counted: list[tuple[dict[Any, float], Mapping[Any, Key], dict[Any, float]]] = []


def counted(keys: Mapping[Any, Key]) -> dict[Any, Any]:
    """A dict to count in by name, each of `keys` at 0 to start, `counts[name] += n` standing for `add(keys[name], n)`
    (a name not in `keys` is a KeyError), passed on at each flush (under `--workers N` every `OBSERVE_PERIOD_S` too, by
    `keep_observed`): a count per event, where `add` per event would write through under `--workers N`, and a dict of
    one's own would need adding up later (a stream's events sent by kind: service/sent.py)."""
    counts: dict[Any, float] = dict.fromkeys(keys, 0)
    _counted.append((counts, keys, {}))
    return counts


class Observer(Protocol):
    def observe(self, amount: float) -> None: ...


class Histogram:
    """A prometheus_client Histogram without labels, observed here: a count per bucket and the sum, folded into the
    metric's own bucket values (non-cumulative, as its `observe` keeps them) at each flush. What a scrape shows is
    the metric's own output: the same name, buckets, `_count`, `_sum` and `_created`. It reads the metric's private
    `_upper_bounds`, `_buckets` and `_sum` (prometheus_client has no public way to add n observations at once);
    tests/test_tally.py compares its scrape with the metric's own `observe`, so a release that renames them fails
    there, not in production."""

    __slots__ = ("metric", "bounds", "counts", "sum", "_done", "_done_sum")

    def __init__(self, metric: Any) -> None:
        self.metric = metric
        self.bounds: tuple[float, ...] = tuple(metric._upper_bounds)  # ascending, the last +Inf
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self._done = [0] * len(self.bounds)
        self._done_sum = 0.0

    def observe(self, amount: float) -> None:
        # the first bound >= amount: the bucket prometheus_client's `observe` counts it in (`amount <= bound`)
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.sum += amount

    def _flush(self) -> None:
        metric, done = self.metric, self._done
        for i, total in enumerate(self.counts.copy()):  # a copy: the loop's thread may observe meanwhile
            if total != done[i]:
                metric._buckets[i].inc(total - done[i])
                done[i] = total
        total_sum = self.sum
        if total_sum != self._done_sum:
            metric._sum.inc(total_sum - self._done_sum)
            self._done_sum = total_sum


_histograms: list[Histogram] = []


def histogram(metric: Any) -> Observer:
    """`metric` (a prometheus_client Histogram without labels) observed through a tally; under `--workers N` the
    metric itself, which writes through."""
    if _WRITE_THROUGH:
        return metric  # type: ignore[no-any-return]
    tallied = Histogram(metric)
    _histograms.append(tallied)
    return tallied


def flush() -> None:
    """Pass on what was added since the last flush."""
    with _lock:
        for key, total in _added.copy().items():  # a copy: the loop's thread may add a key meanwhile
            done = _flushed.get(key, 0)
            if total != done:
                _through(key, total - done)
                _flushed[key] = total
        for counts, keys, done_by_name in _counted:
            for name, total in counts.copy().items():  # a copy, as above
                done = done_by_name.get(name, 0)
                if total != done:
                    _through(keys[name], total - done)
                    done_by_name[name] = total
        for tallied in _histograms:
            tallied._flush()


OBSERVE_PERIOD_S = 1.0
"""How often, under `--workers N`, a gauge read by a function is written to its file: Prometheus scrapes every 15 s
or more, and the reads are of in-memory state."""

_observed: list[tuple[Any, Callable[[], float]]] = []


def observe(gauge: Any, read: Callable[[], float]) -> None:
    """`gauge` (a child of a Gauge) shows `read()`. One process reads it at each scrape (`set_function`); a worker
    cannot, as the scrape happens in the supervisor, which reads only the workers' files, so `keep_observed` writes
    it there every `OBSERVE_PERIOD_S`."""
    if not _WRITE_THROUGH:
        gauge.set_function(read)
        return
    gauge.set(read())
    _observed.append((gauge, read))


async def keep_observed(period_s: float = OBSERVE_PERIOD_S) -> None:
    """Write every `observe`d gauge and what was `counted` every `period_s` until cancelled (under `--workers N`
    only)."""
    while True:
        await asyncio.sleep(period_s)
        for gauge, read in _observed:
            gauge.set(read())
        flush()


class _FlushFirst:
    """A collector with no metrics of its own: collecting it flushes the tally into the metrics read after it."""

    def collect(self) -> Iterable[Metric]:
        flush()
        return []


REGISTRY.register(_FlushFirst())
atexit.register(flush)
