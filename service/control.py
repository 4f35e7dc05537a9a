"""What steers a run from outside the loop: its deadline and requests to stop, now or after the current turn.

The loop awaits nothing from here; it reads the control at its checkpoints and runs inside `scope()`, which ends the
run's current step at once when the deadline passes or `stop_now` is called (the in-flight model stream and tool
calls are cancelled; the loop then reports which calls were cut short and why the run ended).
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Any

from service.errors import DeadlineExceeded, RunError
from service.interact import Inbox


class RunControl:
    """`deadline` is on the event loop's clock (`loop.time()`); None means no deadline."""

    def __init__(self, *, deadline: float | None = None, min_tool_budget_s: float = 0.05) -> None:
        self.deadline = deadline
        self.min_tool_budget_s = min_tool_budget_s
        self._stop: RunError | None = None
        self._after_turn: RunError | None = None
        self._scope: _Scope | None = None
        self.inbox = Inbox()  # what else reaches the run from outside: approvals, steering, stopping one call

    def remaining(self) -> float | None:
        """Seconds left before the deadline (negative when passed), or None without a deadline."""
        if self.deadline is None:
            return None
        return self.deadline - asyncio.get_running_loop().time()

    @property
    def stopping(self) -> bool:
        return self._stop is not None or self._after_turn is not None

    def stop_now(self, reason: RunError) -> None:
        """End the run as soon as possible with `reason`; the first reason wins."""
        if self._stop is None:
            self._stop = reason
        if self._scope is not None and not self._scope.fired:
            self._scope.reschedule(asyncio.get_running_loop().time())

    def stop_after_turn(self, reason: RunError) -> None:
        """Let the current turn (its model stream and tool calls) finish, then end the run with `reason`."""
        if self._after_turn is None:
            self._after_turn = reason

    def after_turn_reason(self) -> RunError | None:
        return self._after_turn

    def stop_reason(self) -> RunError:
        """Why the scope ended the run."""
        return self._stop or DeadlineExceeded("the run's deadline passed before it finished")

    def scope(self) -> _Scope:
        """Runs the body under the deadline; `stop_now` fires it early. Exits with TimeoutError when it fired, and
        `fired` then says so: a TimeoutError raised inside the body (a socket timeout, say) passes through it too.

        The task running the body must not await anything outside it while inside (the agent loop is consumed by
        `service.driver`, which only appends events), or the cancellation would land in the wrong place."""
        return _Scope(self)


class _Scope:
    """`RunControl.scope()`: the run's deadline kept as `asyncio.timeout_at` keeps one (when it passes, the task is
    cancelled and the body exits with TimeoutError), which `stop_now` fires early. Written out rather than wrapping an
    `asyncio.Timeout`: its state checks and the wrapper's coroutines cost every run about as much again as its timer
    (39,000 instructions a run against 17,000 for the timer alone, callgrind). The cancel bookkeeping is Timeout's
    (Python 3.12's, which 3.11's is a case of): a cancel of the task from elsewhere, during or after the deadline,
    stays a CancelledError."""

    __slots__ = ("control", "fired", "_task", "_cancelling", "_handle")

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self.fired = False  # the deadline or `stop_now` ended the body, rather than the body raising TimeoutError
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0
        self._handle: asyncio.Handle | None = None

    async def __aenter__(self) -> _Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a run's scope is entered inside a task")
        self._task, self._cancelling = task, task.cancelling()
        control = self.control
        control._scope = self
        if control._stop is not None:
            self.reschedule(asyncio.get_running_loop().time())
        elif control.deadline is not None:
            self.reschedule(control.deadline)
        return self

    def reschedule(self, when: float) -> None:
        """Fire at `when` (the loop's clock; at once when it has passed) instead."""
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        self._handle = loop.call_soon(self._fire) if when <= loop.time() else loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._task is not None
        self._handle = None
        self.fired = True
        self._task.cancel()

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.control._scope = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        # never suppresses; our own cancel, with no other one asked for meanwhile, leaves as TimeoutError
        task = self._task
        ours = self.fired and task is not None and task.uncancel() <= self._cancelling  # uncancel() whenever fired
        if ours and kind is not None and issubclass(kind, asyncio.CancelledError):
            raise TimeoutError from exc
