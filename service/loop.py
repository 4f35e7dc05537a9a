"""The agent loop: model turn → tool calls → results back to the model → next turn, until the model is done.

It yields domain events (`service.events`) and knows nothing of gRPC. Cancellation contract: cancelling the task
that iterates `AgentLoop.run` (or closing the generator) cancels the model stream and every running tool call, and
waits for them, before the CancelledError leaves the loop; the loop never swallows it. A stop asked through
`RunControl` (deadline, CancelRun) instead ends the run with events: CANCELLED results for the calls in flight,
then `RunFailed`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from types import TracebackType
from typing import Any

from service import telemetry
from service.aio import ABANDON_AFTER_S, merge
from service.config import ModelRetry
from service.control import RunControl, Scope
from service.durable.journal import Journal, recorded_results
from service.errors import MaxTurnsExceeded, RunError
from service.events import (
    Event,
    RunFailed,
    RunStarted,
    ToolResult,
    ToolStatus,
)
from service.executor import Executor, RunContext, ToolCallRequest
from service.model_turn import ModelTurn
from service.models import base as m
from service.policy.retry import jittered_backoff
from service.spec import RunSpec as RunSpec  # where it was defined before: many import it from here
from service.turns import (
    LoopState,
    after_turn,
    check_budgets,
    counted,
    replayed,
    steer,
    stop_if_asked,
    tool_result_block,
)
from tools.base import Tool

log = logging.getLogger(__name__)


class AgentLoop:
    """Drives one model with one executor. Stateless between runs; `sleep` and `clock` are injectable for tests."""

    def __init__(
        self,
        model: m.Model,
        executor: Executor,
        *,
        retry: ModelRetry | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        clock: Callable[[], float] = time.monotonic,
        abandon_after_s: float = ABANDON_AFTER_S,
    ) -> None:
        self.model = model
        self.abandon_after_s = abandon_after_s
        self.executor = executor
        self.retry = retry or ModelRetry()
        self.sleep = sleep
        self.clock = clock
        self._specs: dict[str, m.ToolSpec] = {}
        self._offers: dict[tuple[str, ...], tuple[m.ToolSpec, ...]] = {}
        # up to 1 s of jitter, as tenacity's default: model turns are retried by many runs at once when the API is down
        self._backoff = jittered_backoff(self.retry.initial_backoff_s, self.retry.max_backoff_s, 1.0)

    @staticmethod
    def started(spec: RunSpec) -> RunStarted:
        return RunStarted(model=spec.model, tools=spec.tools, max_turns=spec.max_turns)

    def tool_specs(self, names: Sequence[str]) -> list[m.ToolSpec]:
        """The tools as the model sees them; built once per tool (schema generation costs about a millisecond)."""
        tools: Mapping[str, Tool[Any]] = self.executor.tools
        for name in names:
            if name not in self._specs:
                tool = tools[name]
                self._specs[name] = m.ToolSpec(
                    name=name, description=tool.description, input_schema=tool.input_schema()
                )
        return [self._specs[n] for n in names]

    def _offered(self, names: tuple[str, ...]) -> tuple[m.ToolSpec, ...]:
        """`tool_specs` of a run, kept per set of names (a few hundred at most): most runs offer the same tools, and
        working them out again cost every run about 3,000 instructions. A tuple: every request shares it."""
        specs = self._offers.get(names)
        if specs is None:
            if len(self._offers) >= 256:
                self._offers.clear()
            specs = self._offers[names] = tuple(self.tool_specs(names))
        return specs

    def run(
        self,
        spec: RunSpec,
        control: RunControl | None = None,
        *,
        announce: bool = True,
        journal: Journal | None = None,
    ) -> AsyncIterator[Event]:
        """One run's events: `RunStarted` first, then turns, then `FinalResponse` or `RunFailed` last.

        When `control` stops the run (deadline, immediate cancel), the tool calls in flight are cancelled and each
        gets a `ToolResult` with status CANCELLED before the closing `RunFailed`. `announce=False` leaves out
        `RunStarted` for a caller that has already sent `started(spec)` itself (the registry does, so that the
        first event does not wait for the run's task to be scheduled).

        With a `journal` the run is durable: each model turn and tool result is checkpointed before its events go
        on, and an unsafe call's intent before the call starts. A journal of recorded steps (`Journal.resume`)
        replays them first, silently, after a `RunRecovered` event. `TakenOver` from the store ends the run at once,
        with nothing more sent: another process drives it now.

        Traced, the run is in the `run` span (`_traced`); untraced, its events come with no generator layer of it."""
        if telemetry.tracing_enabled():
            return self._traced(spec, control, announce, journal)
        return self._untraced(spec, control, announce, journal)

    def _untraced(
        self, spec: RunSpec, control: RunControl | None, announce: bool, journal: Journal | None
    ) -> AsyncIterator[Event]:
        # called by `run` with its arguments by position: a wrapper that passed on `*args, **kwargs` (as a decorator
        # around `run` did) cost every run about 3,500 instructions more
        state = LoopState(spec, self.clock(), control or RunControl())  # positional: ~1,000 instructions less
        events = self._run(state, journal)
        # the registry announces the run itself: only the other callers pay for a generator that does it
        return _announced(self.started(spec), events) if announce else events

    async def _traced(
        self, spec: RunSpec, control: RunControl | None, announce: bool, journal: Journal | None
    ) -> AsyncIterator[Event]:
        """`run` in the `run` span, ended ERROR on a failed or cancelled run. The span is passed down explicitly
        (`RunSpec.trace_context`), never made current: a context set inside a generator would leak into whatever
        iterates it."""
        attributes = {"run.id": spec.run_id, "run.model": spec.model, "run.caller": spec.metadata.get("caller", "")}
        span = telemetry.tracer().start_span("run", attributes=attributes)
        spec = replace(spec, trace_context=telemetry.context_with(span))
        try:
            async with aclosing(self._untraced(spec, control, announce, journal)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, RunFailed):
                        telemetry.end_span(span, f"{event.code}: {event.message}")
                    yield event
        except BaseException as exc:
            telemetry.end_span(span, "cancelled" if isinstance(exc, asyncio.CancelledError | GeneratorExit) else exc)
            raise
        span.end()  # a no-op (with a debug log) when already ended by a failure

    async def _run(self, state: LoopState, journal: Journal | None) -> AsyncIterator[Event]:
        """`run`'s events after its `RunStarted`."""
        spec, control = state.spec, state.control
        scope = control.scope()
        ending = _Ending(self, spec, state, scope)
        with ending:
            async with scope:
                recovered = await journal.open() if journal is not None else None
                if recovered is not None:
                    yield recovered
                # The turns are played here, not in a generator of their own: that would cost every run one more
                # generator and every event one more hop through it.
                specs = self._offered(spec.tools)
                for turn in range(1, spec.max_turns + 1):
                    end = None if journal is None else journal.turn(turn)
                    if end is None:
                        texts = steer(state, control.inbox)
                        request = m.TurnRequest(
                            model=spec.model,
                            system=spec.system,
                            messages=list(state.history),
                            tools=specs,
                            max_tokens=spec.max_tokens,
                        )
                        # the model's stream iterated here (`ModelTurn`): a generator of its own would cost the
                        # turn one more generator and every event one more hop through it
                        with ModelTurn(
                            turn, self.retry, self._backoff, self.clock, spec.trace_context, control, state.open_calls
                        ) as model_turn:
                            while True:
                                stream = self.model.stream_turn(request)
                                try:
                                    async for said in stream:
                                        if type(said) is m.TurnEnd:
                                            end = said
                                        else:
                                            yield model_turn.mapped(said)
                                    break
                                except BaseException as exc:
                                    # `aclosing`'s work without its object and its two coroutines per turn, and only
                                    # for a stream cut short: one that ended has nothing to close (its `aclose` cost
                                    # every turn about 1,500 instructions). Then a model failure is retried (or the
                                    # run's error raised), anything else raised again (`failed`).
                                    await stream.aclose()
                                    retrying = model_turn.failed(exc)
                                yield retrying
                                await self.sleep(model_turn.delay)
                        assert end is not None, "a model turn ends with TurnEnd"
                        if journal is not None:
                            await journal.turn_ended(turn, end, texts)
                        yield counted(turn, end, state.totals)
                    else:  # recorded before a crash: not requested again (`replayed`)
                        assert journal is not None
                        if (usage := replayed(turn, end, state, journal)) is not None:
                            yield usage
                    events, calls = after_turn(turn, end, state, self.clock)
                    for event in events:
                        yield event
                    if calls:
                        async for event in self._tool_turn(turn, calls, state, journal):
                            yield event
                    elif calls is None:  # answered: its FinalResponse was the last event
                        break
                else:
                    raise MaxTurnsExceeded(
                        f"the model did not finish within max_turns={spec.max_turns}; "
                        "raise max_turns or simplify the request"
                    )
        for event in ending.events:
            yield event
        await ending.ended(journal)

    async def _tool_turn(
        self, turn: int, calls: Sequence[ToolCallRequest], state: LoopState, journal: Journal | None
    ) -> AsyncIterator[Event]:
        """The tool calls of `turn`, within the run's budgets: their events, each result noted in the run's state as
        it comes, then all of them back into the history for the next turn."""
        spec, control, totals = state.spec, state.control, state.totals
        # a turn replayed whole from the journal (a run revived after its process died) is not the turn a pending
        # CancelRun AFTER_TURN lets end: that is the first the run makes live (an outside finding: a revived run
        # stopped after its replayed turn, cutting off the answer the cancel had let come)
        replayed = journal is not None and all(journal.result(c.call_id) is not None for c in calls)
        check_budgets(spec, totals, len(calls), control)
        totals.tool_calls += len(calls)
        results: dict[str, ToolResult] = {}
        state.open_calls = {c.call_id: c.name for c in calls}
        state.tools_started = self.clock()
        async for event in self._calls(turn, calls, state, results, journal):
            if isinstance(event, ToolResult):
                results[event.call_id] = event
                state.open_calls.pop(event.call_id, None)
                if event.status is ToolStatus.OK:
                    state.context.succeeded.add(event.name)
            yield event
        state.history.append({"role": "user", "content": [tool_result_block(results[c.call_id]) for c in calls]})
        if not replayed:
            stop_if_asked(control)

    def _calls(
        self,
        turn: int,
        calls: Sequence[ToolCallRequest],
        state: LoopState,
        results: dict[str, ToolResult],
        journal: Journal | None,
    ) -> AsyncIterator[Event]:
        """The events of the calls of `turn`. In a durable run, those whose results were recorded before a crash
        go straight into `results` instead: not run again, and nothing of them is sent again (but a result that
        never reached the log, first)."""
        if journal is None:
            return self.execute_tools(calls, state.context)
        recorded = recorded_results(journal, calls)
        for call_id, result in recorded.items():
            results[call_id] = result
            del state.open_calls[call_id]
            if result.status is ToolStatus.OK:
                state.context.succeeded.add(result.name)
        left = [c for c in calls if c.call_id not in results]
        unlogged = [r for r in recorded.values() if journal.unlogged(f"call:{r.call_id}")]
        return self.execute_durably(turn, left, state.context, journal, unlogged)

    def execute_tools(self, calls: Sequence[ToolCallRequest], run: RunContext) -> AsyncIterator[Event]:
        """Run all calls of a turn concurrently; their events interleave, told apart by call id."""
        return self._merged([self._stoppable(c, self.executor.execute(c, run), run) for c in calls], run)

    def _stoppable(self, call: ToolCallRequest, events: AsyncIterator[Event], run: RunContext) -> AsyncIterator[Event]:
        """`events` of `call`, which CancelToolCall may stop (`Inbox.cancellable`)."""
        return events if run.inbox is None else run.inbox.cancellable(call.call_id, call.name, events, self.clock)

    async def execute_durably(
        self,
        turn: int,
        calls: Sequence[ToolCallRequest],
        run: RunContext,
        journal: Journal,
        unlogged: Sequence[ToolResult] = (),
    ) -> AsyncIterator[Event]:
        """`execute_tools` for a durable run: the executor commits an unsafe call's intent before it starts (after
        its approval), and each result is committed before it is passed on. A call whose intent was recorded before
        a crash (and no result) is resumed (`Executor.resume`): run again if it is safe to repeat, else
        `outcome_unknown`, never sent again."""
        for result in unlogged:  # recorded results the crash kept from the log
            yield result
        executor = self.executor
        journal.calls_turn = turn
        run = replace(run, journal=journal)
        cut_off = {c.call_id for c in calls if journal.intended(c.call_id)}
        sources = [
            journal.recording(
                turn,
                self._stoppable(c, executor.resume(c, run) if c.call_id in cut_off else executor.execute(c, run), run),
            )
            for c in calls
        ]
        async for event in self._merged(sources, run):
            yield event

    async def _merged(self, sources: Sequence[AsyncIterator[Event]], run: RunContext) -> AsyncIterator[Event]:
        # A call whose tool ignores its cancellation is abandoned when the run stops, `abandon_after_s` after its
        # cancel (`service.aio`): CancelRun, deadlines and drains are not held up by it. Its own hard timeout is
        # not bounded that way (that would cost every call a task of its own): the run's deadline is.
        calls_of_turn = merge(
            *sources,
            abandon_after_s=functools.partial(_abandon_within, self.abandon_after_s, run.remaining),
            name=f"tool calls of run {run.run_id}",
            fields={"run_id": run.run_id},
        )
        async for event in calls_of_turn:
            yield event


# How long a turn's tool calls get to end once the run's deadline has passed: a call that takes its cancel ends within
# a pass or two of the loop; one that ignores it is abandoned then, not `abandon_after_s` later, since the caller's
# own deadline is only `runs.deadline_margin_s` away and its `error` event must reach it first (an outside finding:
# a stubborn tool held the run's end 0.5 s past the deadline, the call ended "Deadline Exceeded" with no `error`
# event, and the run was recorded CANCELLED)
PAST_DEADLINE_ABANDON_S = 0.02


def _abandon_within(abandon_after_s: float, remaining: Callable[[], float | None] | None) -> float:
    left = remaining() if remaining is not None else None
    return min(abandon_after_s, PAST_DEADLINE_ABANDON_S) if left is not None and left <= 0 else abandon_after_s


async def _announced(started: RunStarted, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
    """`events` after `started`; closing it closes them (`AgentLoop.run`'s cancellation contract)."""
    yield started
    async with aclosing(events):  # type: ignore[type-var]
        async for event in events:
            yield event


class _Ending:
    """How `AgentLoop.run` ends when it is cut short. Around the turns, it takes the TimeoutError of the run's scope
    (the deadline, or a stop) and a `RunError`, and keeps the events that close the run instead: a result for each
    call in flight, then `RunFailed`. A context manager rather than `except` clauses, which would take the turns past
    the complexity allowed for one function, and a generator of their own would cost every event a hop."""

    def __init__(self, loop: AgentLoop, spec: RunSpec, state: LoopState, scope: Scope) -> None:
        self.loop, self.spec, self.run, self.scope = loop, spec, state, scope
        self.events: list[Event] = []
        self.state = "succeeded"  # the state a durable run is left in: no more to recover

    def __enter__(self) -> None:
        pass

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if isinstance(exc, TimeoutError):
            if not self.scope.fired:
                return False  # not the deadline, nor a stop: a bug, which the registry reports as INTERNAL
            self._stopped()
            return True
        if isinstance(exc, RunError):
            self._failed(exc)
            return True
        return False

    async def ended(self, journal: Journal | None) -> None:
        if journal is not None:
            # after the closing event has gone on: a crash in between recovers the run and sends it again
            await journal.end(self.state)

    def _stopped(self) -> None:
        reason = self.run.control.stop_reason()
        clock, started = self.loop.clock, self.run.tools_started
        self.events = [
            ToolResult(
                call_id=call_id,
                name=name,
                status=ToolStatus.CANCELLED,
                duration_s=clock() - started,
                error=f"cancelled: {reason.message}",
            )
            for call_id, name in self.run.open_calls.items()
        ]
        # a caller's cancel is its choice, not a fault of ours: a warning only for deadlines and shutdowns
        level = logging.INFO if reason.code == "CANCELLED" else logging.WARNING
        log.log(level, "run stopped: %s", reason.message, extra={"run_id": self.spec.run_id, "code": reason.code})
        self.state = "cancelled" if reason.code == "CANCELLED" else "failed"
        self.events.append(RunFailed(code=reason.code, message=reason.message, retryable=reason.retryable))

    def _failed(self, exc: RunError) -> None:
        # calls the caller saw begin in a turn that failed, or that a budget stopped: none of them ran
        self.events = [
            ToolResult(
                call_id=call_id,
                name=name,
                status=ToolStatus.REJECTED,
                duration_s=0.0,
                error=f"not run: {exc.message}",
                attempts=0,
            )
            for call_id, name in self.run.open_calls.items()
        ]
        log.warning("run failed: %s", exc.message, extra={"run_id": self.spec.run_id, "code": exc.code})
        self.state = "failed"
        self.events.append(RunFailed(code=exc.code, message=exc.message, retryable=exc.retryable))
