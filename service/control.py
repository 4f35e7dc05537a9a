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
        self._scope: Scope | None = None
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
            self._scope.fire_at(asyncio.get_running_loop().time())

    def stop_after_turn(self, reason: RunError) -> None:
        """Let the current turn (its model stream and tool calls) finish, then end the run with `reason`."""
        if self._after_turn is None:
            self._after_turn = reason

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
    """`RunControl.scope()`: what `asyncio.timeout_at(control.deadline)` does (its timer, its cancel of the task, its
    TimeoutError), and `stop_now` fires it early. The timeout's work is done here rather than by an `asyncio.Timeout`
    inside: one object and one pair of coroutines per run instead of two, and no state enum to check."""

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self.fired = False
        """Whether the deadline or `stop_now` ended the body, rather than the body raising TimeoutError itself."""
        self._handle: asyncio.Handle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._cancelling = 0

    def fire_at(self, when: float) -> None:
        """End the body at `when` on the loop's clock (at once if it has passed), instead of when set before."""
        if self._handle is not None:
            self._handle.cancel()
        loop = asyncio.get_running_loop()
        if when <= loop.time():
            self._handle = loop.call_soon(self._fire)
        else:
            self._handle = loop.call_at(when, self._fire)

    def _fire(self) -> None:
        assert self._task is not None
        self._task.cancel()
        self.fired = True
        self._handle = None

    async def __aenter__(self) -> Scope:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a run's scope is entered in a task")
        self._task = task
        self._cancelling = task.cancelling()
        control = self.control
        control._scope = self
        if control._stop is not None:
            self.fire_at(asyncio.get_running_loop().time())
        elif control.deadline is not None:
            self.fire_at(control.deadline)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.control._scope = None
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self.fired:
            assert self._task is not None
            if self._task.uncancel() <= self._cancelling and kind is asyncio.CancelledError:
                raise TimeoutError from exc  # never suppresses: an expired scope raises TimeoutError
