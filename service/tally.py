"""Counters added to per call, kept as plain ints and handed to Prometheus when it reads them.

A prometheus_client `inc()` takes a lock and checks its metric each time (about 1 µs); a short call did nine of them
(runs by outcome, active runs up and down, tokens in and out, events sent by kind). `add` is a dict update on the
event loop's thread instead, and `flush` passes what was added since the last flush to the metrics: at every scrape
of this process's registry (a collector registered before the service's metrics, so that they are read after it)
and at exit. Only the loop's thread writes `_added`, and flushes (any thread, one at a time) only read it, so no
count is lost to a race.

Under `--workers N` a scrape reads the workers' files, not their registries: there `add` writes through at once,
as before, so that a scrape sees every worker's counts.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Iterable
from typing import Any

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
add = _through if "PROMETHEUS_MULTIPROC_DIR" in os.environ else _tally
"""`add(key, n)`: count `n` on `key`'s metric, `(metric, *label values)`; a Gauge's count may be negative."""


def flush() -> None:
    """Pass on what was added since the last flush."""
    with _lock:
        for key, total in _added.copy().items():  # a copy: the loop's thread may add a key meanwhile
            done = _flushed.get(key, 0)
            if total != done:
                _through(key, total - done)
                _flushed[key] = total


class _FlushFirst:
    """A collector with no metrics of its own: collecting it flushes the tally into the metrics read after it."""

    def collect(self) -> Iterable[Metric]:
        flush()
        return []


REGISTRY.register(_FlushFirst())
atexit.register(flush)
