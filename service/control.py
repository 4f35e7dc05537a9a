"""What steers a run from outside the loop: its deadline and requests to stop, now or after the current turn.

The loop awaits nothing from here; it reads the control at its checkpoints and runs inside `scope()`, which ends the
run's current step at once when the deadline passes or `stop_now` is called (the in-flight model stream and tool
calls are cancelled; the loop then reports which calls were cut short and why the run ended).
"""

from __future__ import annotations

import asyncio
from types import TracebackType

from service.errors import DeadlineExceeded, RunError
from service.interact import Inbox


class RunControl:
    """`deadline` is on the event loop's clock (`loop.time()`); None means no deadline."""

    __slots__ = ("deadline", "min_tool_budget_s", "_stop", "_after_turn", "_scope", "inbox")  # one made per run

    def __init__(self, *, deadline: float | None = None, min_tool_budget_s: float = 0.05) -> None:
        self.deadline = deadline
        self.min_tool_budget_s = min_tool_budget_s
        self._stop: RunError | None = None
        self._after_turn: RunError | None = None
        self._scope: asyncio.Timeout | None = None
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
        if self._scope is not None and not self._scope.expired():
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
    """`RunControl.scope()`: an `asyncio.timeout_at` that the control can fire early. A class rather than an
    `asynccontextmanager`, which would cost every run a generator and its bookkeeping."""

    def __init__(self, control: RunControl) -> None:
        self.control = control
        self.timeout = asyncio.timeout_at(control.deadline)

    @property
    def fired(self) -> bool:
        """Whether the deadline or `stop_now` ended the body, rather than the body raising TimeoutError itself."""
        return self.timeout.expired()

    async def __aenter__(self) -> asyncio.Timeout:
        scope = await self.timeout.__aenter__()
        self.control._scope = scope
        if self.control._stop is not None:
            scope.reschedule(asyncio.get_running_loop().time())
        return scope

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.control._scope = None
        await self.timeout.__aexit__(kind, exc, tb)  # never suppresses: an expired scope raises TimeoutError
