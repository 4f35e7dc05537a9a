"""What reaches a run from outside while it works (issue 17): decisions on tool calls waiting for approval, steering
text for the model, and requests to stop one tool call. One `Inbox` per run, on its `RunControl`. The RPC layer of
the process that drives the run calls `decide`, `send` and `cancel_call` (another replica's requests are carried
here by the run store, `service/state/`); the loop and the executor take from it at their own steps, never the other
way round. A call waiting for approval is an asyncio future: it holds no thread and no core, and the other calls of
its turn go on.

Cancellation contract: `cancellable` runs one call's events under a scope that `cancel_call` fires. The call's
generator is cancelled at its await, as a deadline would cancel it (its sandbox process or HTTP request stopped in
its `finally`), and the call ends with a CANCELLED result the model reads; the run goes on. A stop of the whole run
(deadline, CancelRun) is not this: it cancels the task above, and this scope lets that pass.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service.errors import InvalidRequest, NotNow, PermissionDenied, TooManyInputs
from service.events import Event, InputReceived, ToolResult, ToolStatus
from service.policy.admit import describe

ASAP = "asap"
AFTER_TURN = "after_turn"


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision on a call waiting for approval: by whom, why, and the input to run it with instead (approve only)."""

    approved: bool
    by: str
    reason: str = ""
    edited_input: dict[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Steer:
    text: str
    when: str  # ASAP or AFTER_TURN
    by: str


@dataclass(slots=True)
class _Waiting:
    future: asyncio.Future[Decision]
    refuse: Callable[[Decision], str | None]  # why this identity may not make this decision, or None
    validate: Callable[[dict[str, Any]], Any]  # raises on an edited input the tool refuses


@dataclass(slots=True)
class _Running:
    task: asyncio.Task[Any] | None  # the task stepping the call (merge's pump task for it)
    stepping: bool = False  # inside the call's step, where a cancel may land; not at its `yield`
    cancelled_by: str = ""


@dataclass(slots=True)
class _Calls:
    """An inbox's approvals and running calls, made at its run's first tool call or approval: most runs make none,
    and four containers fewer to make, free and track while the run is kept: a `RunControl` made and freed costs
    9,230 -> 7,080 instructions."""

    waiting: dict[str, _Waiting] = field(default_factory=dict)
    decided: dict[str, str] = field(default_factory=dict)  # call id → who decided it (or "timeout")
    running: dict[str, _Running] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)  # calls that ran here and ended: a cancel for one is named as too late


class Inbox:
    """`max_inputs`: steering texts accepted and not yet read by the loop; beyond it `send` refuses
    (RESOURCE_EXHAUSTED), so that a client sending faster than the run reads costs bounded memory."""

    # one is made per run, and most runs never use it: slots and a list make it about a quarter cheaper to make
    __slots__ = ("max_inputs", "emit", "_inputs", "_made", "_closed")

    def __init__(self, *, max_inputs: int = 16) -> None:
        self.max_inputs = max_inputs
        # where the run's events go (the driver sets it: through its coalescer, so they keep their order in the log)
        self.emit: Callable[[Event], None] | None = None
        self._inputs: list[Steer] = []
        self._made: _Calls | None = None  # see `_calls`
        self._closed: Decision | None = None  # the run stops after its turn: every approval gets this denial

    def _calls(self) -> _Calls:
        calls = self._made
        if calls is None:
            calls = self._made = _Calls()
        return calls

    # approvals: `service/approvals.py` waits, the RPC layer decides

    def expect(
        self,
        call_id: str,
        *,
        refuse: Callable[[Decision], str | None],
        validate: Callable[[dict[str, Any]], Any],
    ) -> asyncio.Future[Decision]:
        future: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()
        self._calls().waiting[call_id] = _Waiting(future, refuse, validate)
        if self._closed is not None:  # no person's rights to check: the run itself declines
            future.set_result(self._closed)
            self.settled(call_id, self._closed.by)
        return future

    def close_approvals(self, denial: Decision) -> None:
        """The run stops after its current turn (CancelRun AFTER_TURN): a call of the turn waiting for approval, or
        asking for it later, is denied with `denial` rather than held until someone decides or its deadline passes
        (the turn would otherwise not end before that)."""
        self._closed = denial
        if self._made is not None:
            for call_id, waiting in list(self._made.waiting.items()):
                if not waiting.future.done():
                    waiting.future.set_result(denial)
                    self.settled(call_id, denial.by)

    def settled(self, call_id: str, by: str) -> None:
        """The wait for `call_id` is over (decided, timed out or cancelled): later decisions are named as late."""
        calls = self._calls()
        calls.waiting.pop(call_id, None)
        calls.decided.setdefault(call_id, by)

    def decide(self, call_id: str, decision: Decision) -> None:
        """Hand `decision` to the call waiting for it. Raises
        when nothing waits for it, the identity may not decide so, or the edited input is refused (the call then
        goes on waiting)."""
        calls = self._calls()
        waiting = calls.waiting.get(call_id)
        if waiting is None or waiting.future.done():
            if call_id in calls.decided:
                raise NotNow(f"call {call_id!r} was already decided (by {calls.decided[call_id]}); nothing waits")
            raise NotNow(f"no call {call_id!r} waits for approval in this run")
        refused = waiting.refuse(decision)
        if refused is not None:
            raise PermissionDenied(refused, reason="DECISION_NOT_PERMITTED")
        if decision.edited_input is not None:
            if not decision.approved:
                raise InvalidRequest("edited_input goes with an approval, not a denial")
            try:
                waiting.validate(decision.edited_input)
            except Exception as exc:
                why = describe(exc) if isinstance(exc, ValidationError) else str(exc)
                raise InvalidRequest(f"edited_input refused by the tool; the call still waits: {why}"[:1000]) from exc
        waiting.future.set_result(decision)
        self.settled(call_id, decision.by)

    # steering: the loop takes the texts before each model request

    def send(self, steer: Steer) -> None:
        if self.emit is None:
            raise NotNow("the run has not started yet (queued); send input once it runs")
        if len(self._inputs) >= self.max_inputs:
            raise TooManyInputs(
                f"the run has {self.max_inputs} inputs it has not read yet, its bound; send again once it has"
            )
        self.emit(InputReceived(text=steer.text, when=steer.when, sent_by=steer.by))  # raises once the run ended
        self._inputs.append(steer)

    def take_inputs(self, *, asap_only: bool) -> list[Steer]:
        """The texts due now: all at a turn's boundary, only the ASAP ones within a turn (a paused turn's next
        request); AFTER_TURN ones wait for the turn's end, in their order."""
        if asap_only:
            due = [s for s in self._inputs if s.when == ASAP]
            self._inputs = [s for s in self._inputs if s.when != ASAP]
            return due
        due, self._inputs = self._inputs, []
        return due

    @property
    def has_inputs(self) -> bool:
        return bool(self._inputs)

    # stopping one call

    def cancel_call(self, call_id: str, by: str) -> None:
        calls = self._calls()
        running = calls.running.get(call_id)
        if running is None:
            if call_id in calls.ended:
                raise NotNow(f"call {call_id!r} has already ended; nothing to cancel")
            raise NotNow(f"no call {call_id!r} is running in this run")
        if running.cancelled_by:
            raise NotNow(f"call {call_id!r} is already being cancelled (by {running.cancelled_by})")
        running.cancelled_by = by
        if running.stepping and running.task is not None:
            running.task.cancel()  # else the call's next step does not start

    async def cancellable(
        self, call_id: str, name: str, events: AsyncIterator[Event], clock: Callable[[], float]
    ) -> AsyncIterator[Event]:
        """`events` (one call's), ended with a CANCELLED result when `cancel_call` names the call. The cancel lands
        only inside a step of the call, never at the `yield`, where it would hit the consumer instead; a cancel of
        the task by anyone else as well (the run stopping) is not taken for ours. A task cancel, not a timeout scope
        per step: a fraction of the cost per event (measured: docs/interactive.md)."""
        calls = self._made or self._calls()  # per call: no method call once made
        running = calls.running[call_id] = _Running(asyncio.current_task())
        started = clock()
        try:
            while not running.cancelled_by:
                running.stepping = True
                try:
                    event = await anext(events)
                except StopAsyncIteration:
                    return
                except asyncio.CancelledError:
                    if not _took_own_cancel(running):
                        raise
                    break
                finally:
                    running.stepping = False
                yield event
            aclose = getattr(events, "aclose", None)
            if aclose is not None:
                await aclose()  # cancelled between steps: the call is closed before its result is said
            yield ToolResult(
                call_id=call_id,
                name=name,
                status=ToolStatus.CANCELLED,
                duration_s=clock() - started,
                error=f"cancelled by {running.cancelled_by} (CancelToolCall); the call was stopped",
            )
        finally:
            running.task = None  # a traceback keeps this frame: it must not keep the task (a cycle) too
            calls.running.pop(call_id, None)
            calls.ended.add(call_id)


def _took_own_cancel(running: _Running) -> bool:
    """Whether the CancelledError in a call's step is CancelToolCall's alone; if so, taken back from the task (the
    call ends with a result, the run goes on). No local here or in the caller holds the task: see `cancellable`."""
    if not running.cancelled_by or running.task is None or running.task.cancelling() > 1:
        return False
    running.task.uncancel()
    return True
