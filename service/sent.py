"""Events sent to callers by kind: the `agent_events_sent_total` counter and how a stream counts in it.

A stream counts each event it sends by its class in `SENT`, a dict the tally (service/tally.py) passes on to the
counter at each scrape (under `--workers N` every second too). A labelled `inc()` per event (a lock each time) was a
measurable share of the per-event cost; so were a stream's counts of its own, added up every 64 events and at its end
(a short call's four kinds added at its end: 7,500 instructions, measured alone under callgrind).
"""

from __future__ import annotations

from typing import Any, get_args

from prometheus_client import Counter

from service import tally
from service.events import Event

EVENTS = Counter("agent_events_sent_total", "Events sent to callers by kind", ["kind"])

# The tally key of each kind's count, made once: the same tuple each time is found in the tally by identity, where a
# new one is made and compared field by field.
_SENT_KEYS: dict[type[Event], tuple[Any, str]] = {kind: (EVENTS, kind.kind) for kind in get_args(Event)}

SENT: dict[type[Event], int] = tally.counted(_SENT_KEYS)
"""Events sent by kind, `SENT[kind] += 1` for each (every kind there from the start: the `get` of a kind not counted
yet, a call per event, is not needed): written on the event loop's thread only."""
