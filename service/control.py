"""What steers a run from outside the loop: its deadline and requests to stop, now or after the current turn.

The loop awaits nothing from here; it reads the control at its checkpoints and runs inside `scope()`, which ends the
run's current step at once when the deadline passes or `stop_now` is called (the in-flight model stream and tool
calls are cancelled; the loop then reports which calls were cut short and why the run ended).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from types import TracebackType
from typing import Any

from service.errors import DeadlineExceeded, RunCancelled, RunError
from service.interact import Decision, Inbox


class RunControl:
    """`deadline` is on the event loop's clock (`loop.time()`); None means no deadline."""

    __slots__ = ("deadline", "min_tool_budget_s", "loop", "_stop", "_after_turn", "_scope", "inbox")  # one per run

    def __init__(
        self,
        *,
        deadline: float | None = None,
        min_tool_budget_s: float = 0.05,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self.deadline = deadline
        # The event loop the run runs on, when its maker knows it (the registry does). Python 3.11's
        # `asyncio.get_running_loop()` and `current_task()` without a loop each make a getpid() system call (to
        # notice a fork): a run's start asked five times, about 0.4 us each on this kind of VM (strace: 6.85 getpid a
        # call against the bare server's 1). None: asked of asyncio where needed.
        self.loop = loop
        self.min_tool_budget_s = min_tool_budget_s
        self._stop: RunError | None = None
        self._after_turn: RunError | None = None
        self._scope: Scope | None = None
        self.inbox = Inbox()  # what else reaches the run from outside: approvals, steering, stopping one call

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative when passed), or None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - (self.loop or asyncio.get_running_loop()).time()

    @property
    def stopping(self) -> bool:
        return self._stop is not None or self._after_turn is not None

    def stop_now(self, reason: RunError) -> None:
        """End the run as soon as possible with `reason`; the first reason wins."""
        if self._stop is None:
            self._stop = reason
        if self._scope is not None and not self._scope.fired:
            self._scope.fire_soon()

    def stop_after_turn(self, reason: RunError) -> None:
        """Let the current turn (its model stream and tool calls) finish, then end the run with `reason`."""
        if self._after_turn is None:
            self._after_turn = reason
            # a tool call of this turn waiting for a person would hold the turn's end until its approval deadline
            self.inbox.close_approvals(
                Decision(False, "CancelRun", "the run stops after this turn; the call did not run")
            )

    def after_turn_reason(self) -> RunError | None:
        return self._after_turn

    def stop_reason(self) -> RunError:
        """Why the scope ended the run."""
        return self._stop or DeadlineExceeded("the run's deadline passed before it finished")

    def scope(self) -> Scope:
        """Runs the body under the deadline; `stop_now` fires it early. Exits with TimeoutError when it fired, and
        `fired` then says so: a TimeoutError raised inside the body (a socket timeout, say) passes through it too.

        The task running the body must not await anything outside it while inside (the agent loop is consumed by
        `service.driver`, which only appends events), or the cancellation would land in the wrong place."""
        return Scope(self)


class Scope:
    """`RunControl.scope()`: what `asyncio.timeout_at(control.deadline)` does (cancel the task at the deadline, and
    exit with TimeoutError), and `stop_now` fires it early. The timeout's work is done here rather than by an
    `asyncio.Timeout` inside (one object per run and no coroutine, instead of two objects and two pairs of
    coroutines), and its deadline waits with the other runs' on one timer (`_Deadlines`)."""

    __slots__ = ("control", "fired", "_entry", "_deadlines", "_handle", "_task", "_cancelling")  # one made per run

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self.fired = False
        """Whether the deadline or `stop_now` ended the body, rather than the body raising TimeoutError itself."""
        self._entry: list[Any] | None = None  # its deadline's place in `_deadlines`, while it waits there
        self._deadlines: _Deadlines | None = None
        self._handle: asyncio.Handle | None = None  # `stop_now`'s
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0

    def fire_soon(self) -> None:
        """End the body at the loop's next turn, as an `asyncio.Timeout` rescheduled to now does."""
        self._forget_deadline()
        if self._handle is not None:
            self._handle.cancel()
        self._handle = (self.control.loop or asyncio.get_running_loop()).call_soon(self._fire)

    def _fire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self.fired = True
        self._handle = None

    def _forget_deadline(self) -> None:
        entry = self._entry
        if entry is not None:
            entry[2] = None
            self._entry = None
            deadlines = self._deadlines
            assert deadlines is not None
            deadlines.done += 1  # an entry marked done before its deadline; swept out when they are most of the heap
            if deadlines.done > 64 and 2 * deadlines.done > len(deadlines.heap):
                deadlines.sweep()

    # `__aenter__` and `__aexit__` never wait: they do their work at once and hand back an awaitable that is done
    # already (a shared done future, which an `await` reads without a step of the loop) rather than being coroutines,
    # one made and stepped per call: about 2,600 instructions a run less. So `async with scope as x` binds None;
    # keep the scope itself.

    def __aenter__(self) -> asyncio.Future[None]:
        control = self.control
        loop = control.loop or asyncio.get_running_loop()
        task = asyncio.current_task(loop)
        if task is None:
            raise RuntimeError("a run's scope is entered in a task")
        self._task = task
        self._cancelling = task.cancelling()
        control._scope = self
        if control._stop is not None:
            self.fire_soon()
        elif control.deadline is not None:
            if control.deadline <= loop.time():
                self.fire_soon()
            else:
                # `_Deadlines.of(loop).add(...)`, inline: a run's start pays no calls for it (about 1,500
                # instructions)
                deadlines = _Deadlines._current
                if deadlines is None or deadlines.loop is not loop:
                    deadlines = _Deadlines.of(loop)
                self._deadlines = deadlines
                when = control.deadline
                self._entry = entry = [when, next(deadlines.order), self]
                heapq.heappush(deadlines.heap, entry)
                if when < deadlines.armed_at:
                    deadlines._arm(when)
        return _READY or _ready(loop)

    def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> asyncio.Future[None]:
        self.control._scope = None
        if self._entry is not None:
            self._forget_deadline()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        task, self._task = self._task, None
        if self.fired:
            assert task is not None
            if task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from exc  # never suppresses: an expired scope raises TimeoutError
        return _READY or _ready(asyncio.get_running_loop())  # its result, None, suppresses nothing


_READY: asyncio.Future[None] | None = None


def _ready(loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
    """A future that is done, with None: awaiting one that is done reads its result and never touches its loop, so
    one serves every loop."""
    global _READY
    if _READY is None:
        ready = loop.create_future()
        ready.set_result(None)
        _READY = ready
    return _READY


# asyncio runs a timer once the loop's clock is within this of its time: the deadlines here are run the same way
_RESOLUTION = time.get_clock_info("monotonic").resolution


class _Deadlines:
    """The deadlines of an event loop's scopes, on one timer armed for the earliest. A timer per run would push a
    TimerHandle on the loop's heap (ordered by Python-level comparisons) and leave it there cancelled when the run
    ends first, as nearly every run does, for the loop to sweep out later: here a run's deadline is a list pushed on
    a heap of plain values, marked done when its run ends, and swept out in one pass once most entries are done."""

    _current: _Deadlines | None = None  # the running loop's, most likely: one loop per process but in tests

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.heap: list[list[Any]] = []  # [when, order, scope or None once done]
        self.order = itertools.count()  # equal deadlines fire in the order they were set, as timers do
        self.done = 0
        self.timer: asyncio.TimerHandle | None = None
        self.armed_at = math.inf

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        deadlines = cls._current
        if deadlines is None or deadlines.loop is not loop:
            deadlines = cls._current = cls(loop)  # a loop left behind keeps its own: its timer holds it
        return deadlines

    def sweep(self) -> None:
        """Drop the entries marked done (`Scope._forget_deadline` counts them)."""
        self.heap = [entry for entry in self.heap if entry[2] is not None]
        heapq.heapify(self.heap)
        self.done = 0

    def _arm(self, when: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.armed_at = when
        self.timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self.timer, self.armed_at = None, math.inf
        heap, due = self.heap, self.loop.time() + _RESOLUTION
        while heap and (heap[0][0] < due or heap[0][2] is None):
            scope: Scope | None = heapq.heappop(heap)[2]
            if scope is None:
                self.done -= 1
            else:
                scope._entry = None
                scope._fire()
        if heap:
            self._arm(heap[0][0])


def cancel_reason(*, after_turn: bool) -> RunCancelled:
    """What a run stopped by CancelRun ends with, in either mode (driven here, or revived with a kept cancel)."""
    return RunCancelled("cancelled by CancelRun after the current turn" if after_turn else "cancelled by CancelRun")


def stop_as_marked(control: RunControl, mode: str | bytes | None) -> None:
    """Stop a revived run as a CancelRun kept for it asked (`RunKeeper.mark_cancel`): "now", "after_turn" or none."""
    if mode in ("after_turn", b"after_turn"):
        control.stop_after_turn(cancel_reason(after_turn=True))
    elif mode:
        control.stop_now(cancel_reason(after_turn=False))
