"""First events first: while a new `RunAgent` call has not sent its first event, streams already under way hold
their next event.

On a saturated event loop every callback waits behind all the others, and a new call needs several turns of the
loop before its first byte leaves (its take-up, its request message, its first write). Streams already under way
fill those turns with their next events: at C = 1000 on the paced workload the last calls were taken up 1.6 s
after the first, behind the tokens of the runs started before them, where the bare server had taken up all of
them within 0.17 s (docs/performance-log.md, "Where the tail is"). A caller waiting for a first event waits for
everything; a stream under way loses little by holding its next event a moment, and its held text deltas leave
merged (the run's coalescer and the subscriber's lag do that). So streams under way hold while any new call has
not sent its first event, for at most `hold_s` at a time: a server that never catches up with its new calls still
moves every stream on at least that often.

A stream whose run has ended does not hold: its events are all there, and sending them ends its call and frees
what it holds (a burst of short calls would otherwise pay a hold per event: about 76,000 instructions a call,
counted live under callgrind with 20 calls in flight, where the loop always reads saturated).

Only a saturated loop holds (`LoopLoad.busy` at `SATURATED_BUSY`, the share at which the coalescer's window is
widest). Below it every callback runs soon anyway, and under a steady flow of new calls some call is nearly always
starting: holding then would slow every stream to one event per `hold_s` for nothing.

A hold costs one shared `asyncio.Event` and one timer per spell, not per stream; a stream checks an int per
event when nothing is pending.
"""

from __future__ import annotations

import asyncio

from service.coalesce import SATURATED_BUSY, LoopLoad


class FirstsFirst:
    __slots__ = ("pending", "held", "hold_s", "load", "_spell", "_timer")

    def __init__(self, hold_s: float, load: LoopLoad) -> None:
        self.pending = 0  # RunAgent calls started that have not sent their first event (the stream counts itself)
        self.held = 0  # streams holding now
        self.hold_s = hold_s
        self.load = load
        self._spell: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None

    def end(self) -> None:
        """A call counted in `pending` has sent its first event, or ended without one."""
        self.pending -= 1
        if self.pending == 0 and self._spell is not None:
            self._release()

    async def wait(self, deadline: float | None = None) -> None:
        """What a stream under way waits for before its next event: nothing when no new call is pending or the loop
        is not saturated, or when its run's `deadline` (loop time) is less than `hold_s` away: its `error` event must
        not wait behind new calls (an outside finding: calls whose deadline fell during a burst of 300 new streams
        got none). Streams that hold together share one spell, which ends when no call is pending or `hold_s` after
        it began."""
        if self.pending == 0 or self.hold_s <= 0 or self.load.busy < SATURATED_BUSY:
            return
        loop = asyncio.get_running_loop()
        if deadline is not None and deadline - loop.time() < self.hold_s:
            return
        spell = self._spell
        if spell is None:
            spell = self._spell = asyncio.Event()
            self._timer = loop.call_later(self.hold_s, self._release)
        self.held += 1
        try:
            await spell.wait()
        finally:
            self.held -= 1

    def _release(self) -> None:
        spell, self._spell = self._spell, None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if spell is not None:
            spell.set()
