"""Merging text deltas at the source, more of them when the process is busy.

Each event sent costs the same whatever its size (in grpc.aio most of it is per message), so when the event loop
is saturated, sending fewer, larger deltas is what lets it catch up. `LoopLoad` measures how busy the loop is;
the `Coalescer` widens its window with that load, up to a cap: text then arrives in larger pieces instead of ever
later. When the loop has time to spare, the window is the configured one and nothing changes.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import replace

from service import events as ev
from service import telemetry

DELTAS = (ev.TextDelta, ev.Thinking)


class LoopLoad:
    """How busy the event loop is. Every `interval_s` a probe reads the loop thread's CPU time against the clock:
    `busy` is the share of a core the loop used (0 to 1), `lag_s` how late the probe's own timer fired. Both
    estimates rise to a higher reading at once and halve their distance to a lower one, so a busy spell is acted on
    at once and forgotten a few probes after it ends. Under grpc.aio the busy share is the telling one: saturated,
    the loop still runs its timers nearly on time, but every turn of it is full, and grpc takes up one new call per
    turn. Exported as `agent_event_loop_busy_ratio` and `agent_event_loop_lag_seconds`."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.busy = 0.0
        self.lag_s = 0.0

    def observe(self, busy: float, lag_s: float) -> None:
        self.busy = busy if busy >= self.busy else (self.busy + busy) / 2
        self.lag_s = lag_s if lag_s >= self.lag_s else (self.lag_s + lag_s) / 2
        telemetry.LOOP_BUSY.set(self.busy)
        telemetry.LOOP_LAG.set(self.lag_s)

    async def probe_forever(self) -> None:
        loop = asyncio.get_running_loop()
        wall, cpu = loop.time(), time.thread_time()
        while True:
            await asyncio.sleep(self.interval_s)
            now, used = loop.time(), time.thread_time()
            elapsed = max(now - wall, 1e-9)
            self.observe(busy=min(1.0, (used - cpu) / elapsed), lag_s=max(0.0, elapsed - self.interval_s))
            wall, cpu = now, used


# Between these shares of a core used by the event loop, the merge window grows from its configured width to its cap.
CALM_BUSY = 0.5
SATURATED_BUSY = 0.9


class Coalescer:
    """Merges small text/thinking deltas that follow each other within the window, up to `max_bytes`, before they
    are logged (`append`). The window is `window_s` while the loop has time to spare and widens as `load` rises,
    up to `max_window_s` once the loop is saturated, or to the loop's lag if that is longer (still within the cap);
    `window_s` 0 turns merging off. The first delta after a quiet spell goes out at once, so the time to the first
    token does not wait for the window."""

    # one is made per run (with merging on): slots and no float parsing save it about 700 instructions
    __slots__ = ("append", "window_s", "max_window_s", "max_bytes", "clock", "load", "pending", "last_emit", "timer")

    def __init__(
        self,
        append: Callable[[ev.Event], None],
        *,
        window_s: float,
        max_bytes: int,
        clock: Callable[[], float],
        max_window_s: float = 0.0,
        load: LoopLoad | None = None,
    ) -> None:
        self.append = append
        self.window_s = window_s
        self.max_window_s = max(window_s, max_window_s)
        self.max_bytes = max_bytes
        self.clock = clock
        self.load = load
        self.pending: ev.TextDelta | ev.Thinking | None = None
        self.last_emit = -math.inf
        self.timer: asyncio.TimerHandle | None = None

    def window(self) -> float:
        load = self.load
        if self.window_s <= 0 or load is None:
            return self.window_s
        pressure = min(1.0, max(0.0, (load.busy - CALM_BUSY) / (SATURATED_BUSY - CALM_BUSY)))
        widened = self.window_s + (self.max_window_s - self.window_s) * pressure
        return min(self.max_window_s, max(widened, load.lag_s))

    def add(self, event: ev.Event) -> None:
        # per event: the window is worked out for deltas only, and there is nothing to flush unless a delta waits
        if self.window_s > 0 and isinstance(event, DELTAS) and (window := self.window()) > 0:
            self._merge(event, window)
            return
        if self.pending is not None or self.timer is not None:
            self.flush()
        self.append(event)

    def _merge(self, event: ev.TextDelta | ev.Thinking, window: float) -> None:
        pending = self.pending
        if pending is not None and (type(pending) is not type(event) or pending.turn != event.turn):
            self.flush()
            pending = None
        since = self.clock() - self.last_emit
        if pending is None and since >= window:
            self._emit(event)
            return
        self.pending = event if pending is None else replace(pending, text=pending.text + event.text)
        if len(self.pending.text) >= self.max_bytes:
            self.flush()
        elif self.timer is None:
            self.timer = asyncio.get_running_loop().call_later(max(0.0, window - since), self.flush)

    def flush(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self._emit(pending)

    def _emit(self, event: ev.Event) -> None:
        self.last_emit = self.clock()
        self.append(event)
