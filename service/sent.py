"""Events sent to callers by kind: the `agent_events_sent_total` counter and how a stream counts in it.

A stream counts each event it sends by its class in a dict (`sent_counts()`) and hands the dict to `add_sent` every
`SentCounts.every` events and at its end. Without `--workers N` the dict is the tally's own (service/tally.py),
passed on to the counter at each scrape, and `add_sent` has nothing to do; under `--workers N`, where counts are
written through, it is the stream's own, and `add_sent` writes it through: a labelled `inc()` per event (a lock each
time) was a measurable share of the per-event cost.
"""

from __future__ import annotations

from typing import Any, get_args

from prometheus_client import Counter

from service import tally
from service.events import Event

EVENTS = Counter("agent_events_sent_total", "Events sent to callers by kind", ["kind"])

# The tally key of each kind's count, made once: the same tuple each time is found in the tally by identity, where a
# new one is made and compared field by field (with `__slots__`, 3,800 instructions less a short call's stream).
_SENT_KEYS: dict[type[Event], tuple[Any, str]] = {kind: (EVENTS, kind.kind) for kind in get_args(Event)}

# Counted straight in the tally: a short call's stream added its four kinds at its end, 7,500 instructions (its
# stream of a finished run 117,000 -> 110,300, measured alone under callgrind).
_TALLIED: dict[type[Event], int] | None = None if tally.multiprocess() else tally.counted(_SENT_KEYS)


def sent_counts() -> dict[type[Event], int]:
    """The dict a stream counts its events sent in, `counts[kind] = counts.get(kind, 0) + 1`: the tally's own, or
    under `--workers N` a new one of the stream's own."""
    return {} if _TALLIED is None else _TALLIED


def add_sent(counts: dict[type[Event], int]) -> None:
    """Add `counts`, events sent by kind, to the events-sent counter, and empty it (the tally's own: nothing to do,
    it is passed on at each scrape)."""
    if counts is not _TALLIED:
        tally.add_counts(counts, _SENT_KEYS)
        counts.clear()


class SentCounts:
    """The events-sent counter for one HTTP stream, as the gRPC stream counts with locals (service/rpc/runstream.py):
    by kind in `sent_counts()`, handed to `add_sent` every `every` events and when the stream ends."""

    __slots__ = ("counts", "due", "seen")
    every = 64

    def __init__(self) -> None:
        self.counts = sent_counts()
        self.due = self.every
        self.seen = 0

    def add(self, kind: type[Event]) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.seen += 1
        if self.seen >= self.due:
            self.flush(self.seen)

    def flush(self, seq: int = 0) -> None:
        add_sent(self.counts)
        self.due = seq + self.every
