"""The agent loop: model turn → tool calls → results back to the model → next turn, until the model is done.

It yields domain events (`service.events`) and knows nothing of gRPC. Cancellation contract: cancelling the task
that iterates `AgentLoop.run` (or closing the generator) cancels the model stream and every running tool call, and
waits for them, before the CancelledError leaves the loop; the loop never swallows it. A stop asked through
`RunControl` (deadline, CancelRun) instead ends the run with events: CANCELLED results for the calls in flight,
then `RunFailed`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import replace
from typing import Any

from service import telemetry
from service.aio import ABANDON_AFTER_S, merge
from service.config import ModelRetry
from service.control import RunControl
from service.durable.journal import Journal, recorded_results
from service.errors import (
    MaxTurnsExceeded,
    RunError,
)
from service.events import (
    Event,
    FinalResponse,
    RunFailed,
    RunStarted,
    ToolCall,
    ToolResult,
    ToolStatus,
)
from service.executor import Executor, RunContext, ToolCallRequest
from service.model_turn import stream_turn
from service.models import base as m
from service.policy.retry import jittered_backoff
from service.spec import RunSpec as RunSpec  # where it was defined before: many import it from here
from service.turns import (
    LoopState,
    check_budgets,
    counted,
    not_run,
    steer,
    steered,
    stop_if_asked,
    tool_calls_of,
    tool_result_block,
)
from tools.base import Tool

log = logging.getLogger(__name__)


_RunMethod = Callable[..., AsyncIterator[Event]]


def _traced(run: _RunMethod) -> _RunMethod:
    """Wrap `AgentLoop.run` in the `run` span, ended ERROR on a failed or cancelled run. The span is passed down
    explicitly (`RunSpec.trace_context`), never made current: a context set inside a generator would leak into
    whatever iterates it. Without tracing, `run` is returned unwrapped: one generator layer less on every event."""

    async def in_span(self: AgentLoop, spec: RunSpec, *args: Any, **kwargs: Any) -> AsyncIterator[Event]:
        attributes = {"run.id": spec.run_id, "run.model": spec.model, "run.caller": spec.metadata.get("caller", "")}
        span = telemetry.tracer().start_span("run", attributes=attributes)
        spec = replace(spec, trace_context=telemetry.context_with(span))
        try:
            async with aclosing(run(self, spec, *args, **kwargs)) as events:  # type: ignore[type-var]
                async for event in events:
                    if isinstance(event, RunFailed):
                        telemetry.end_span(span, f"{event.code}: {event.message}")
                    yield event
        except BaseException as exc:
            telemetry.end_span(span, "cancelled" if isinstance(exc, asyncio.CancelledError | GeneratorExit) else exc)
            raise
        span.end()  # a no-op (with a debug log) when already ended by a failure

    def traced(self: AgentLoop, spec: RunSpec, *args: Any, **kwargs: Any) -> AsyncIterator[Event]:
        if telemetry.tracing_enabled():
            return in_span(self, spec, *args, **kwargs)
        return run(self, spec, *args, **kwargs)

    traced.__doc__ = run.__doc__
    return traced


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

    @_traced
    async def run(
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
        with nothing more sent: another process drives it now."""
        control = control or RunControl()
        state = LoopState(spec, started=self.clock(), control=control)
        if announce:
            yield self.started(spec)
        scope = control.scope()
        ended = "succeeded"  # the state a durable run is left in: no more to recover
        try:
            async with scope:
                if journal is not None:
                    recovered = await journal.open()
                    if recovered is not None:
                        yield recovered
                async for event in self._turns(spec, state, control, journal):
                    yield event
        except TimeoutError:
            if not scope.fired:
                raise  # not the deadline, nor a stop: a bug, which the registry reports as INTERNAL with its traceback
            reason = control.stop_reason()
            for call_id, name in state.open_calls.items():
                yield ToolResult(
                    call_id=call_id,
                    name=name,
                    status=ToolStatus.CANCELLED,
                    duration_s=self.clock() - state.tools_started,
                    error=f"cancelled: {reason.message}",
                )
            # a caller's cancel is its choice, not a fault of ours: a warning only for deadlines and shutdowns
            level = logging.INFO if reason.code == "CANCELLED" else logging.WARNING
            log.log(level, "run stopped: %s", reason.message, extra={"run_id": spec.run_id, "code": reason.code})
            ended = "cancelled" if reason.code == "CANCELLED" else "failed"
            yield RunFailed(code=reason.code, message=reason.message, retryable=reason.retryable)
        except RunError as exc:
            # calls the caller saw begin in a turn that failed, or that a budget stopped: none of them ran
            for call_id, name in state.open_calls.items():
                yield ToolResult(
                    call_id=call_id,
                    name=name,
                    status=ToolStatus.REJECTED,
                    duration_s=0.0,
                    error=f"not run: {exc.message}",
                    attempts=0,
                )
            log.warning("run failed: %s", exc.message, extra={"run_id": spec.run_id, "code": exc.code})
            ended = "failed"
            yield RunFailed(code=exc.code, message=exc.message, retryable=exc.retryable)
        if journal is not None:
            # after the closing event has gone on: a crash in between recovers the run and sends it again
            await journal.end(ended)

    async def _turns(
        self, spec: RunSpec, state: LoopState, control: RunControl, journal: Journal | None
    ) -> AsyncIterator[Event]:
        specs = self.tool_specs(spec.tools)
        totals = state.totals
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
                async for event in self.request_model(turn, request, trace_context=spec.trace_context, control=control):
                    if isinstance(event, m.TurnEnd):
                        end = event
                    else:
                        if type(event) is ToolCall:  # from here on, the call gets a result whatever happens
                            state.open_calls[event.call_id] = event.name
                        yield event
                assert end is not None, "a model turn ends with TurnEnd"
                if journal is not None:
                    await journal.turn_ended(turn, end, texts)
                yield counted(turn, end, totals)
            else:  # recorded before a crash: not requested again; the steering its request read goes in again
                assert journal is not None
                steered(state, journal.steered(turn))
                if journal.unlogged(f"turn:{turn}"):
                    yield counted(turn, end, totals)  # recorded, but its `usage` never reached the log: sent now
                else:  # its events are in the log already
                    totals.input_tokens += end.input_tokens
                    totals.output_tokens += end.output_tokens
            answer = state.record(end)
            if state.paused:
                # The API paused a long turn: sent back as it stands (the assistant message last), it goes on.
                stop_if_asked(control)
                continue
            calls = tool_calls_of(end)
            if end.stop_reason == "refusal":
                # The API stopped the turn for safety: the calls in it are not the model's to make, and none runs.
                # Each still gets a result, as every call the caller saw begin does.
                for call in calls:
                    yield not_run(call, "the model's turn was stopped (refusal)")
                state.open_calls = {}
                calls = []
            if not calls and control.inbox.has_inputs:
                continue  # steering came while the model answered: the answer to it is the one that counts
            if not calls:
                yield FinalResponse(
                    text="".join(b["text"] for b in answer if b["type"] == "text"),
                    stop_reason=end.stop_reason,
                    turns=turn,
                    tool_calls=totals.tool_calls,
                    input_tokens=totals.input_tokens,
                    output_tokens=totals.output_tokens,
                    duration_s=self.clock() - state.started,
                )
                return
            check_budgets(spec, totals, len(calls), control)
            totals.tool_calls += len(calls)
            results: dict[str, ToolResult] = {}
            state.open_calls = {c.call_id: c.name for c in calls}
            state.tools_started = self.clock()
            async for event in self._noted_calls(turn, calls, state, results, journal):
                yield event
            state.history.append({"role": "user", "content": [tool_result_block(results[c.call_id]) for c in calls]})
            stop_if_asked(control)
        raise MaxTurnsExceeded(
            f"the model did not finish within max_turns={spec.max_turns}; raise max_turns or simplify the request"
        )

    def request_model(
        self, turn: int, request: m.TurnRequest, *, trace_context: Any = None, control: RunControl | None = None
    ) -> AsyncIterator[Event | m.TurnEnd]:
        """One model turn's events, ending with its `TurnEnd` (`service/model_turn.py`)."""
        return stream_turn(
            self.model,
            turn,
            request,
            retry=self.retry,
            backoff=self._backoff,
            sleep=self.sleep,
            clock=self.clock,
            trace_context=trace_context,
            control=control,
        )

    async def _noted_calls(
        self,
        turn: int,
        calls: Sequence[ToolCallRequest],
        state: LoopState,
        results: dict[str, ToolResult],
        journal: Journal | None,
    ) -> AsyncIterator[Event]:
        """`_calls`' events, each result noted in `results` and the run's state as it comes."""
        async for event in self._calls(turn, calls, state, results, journal):
            if isinstance(event, ToolResult):
                results[event.call_id] = event
                state.open_calls.pop(event.call_id, None)
                if event.status is ToolStatus.OK:
                    state.context.succeeded.add(event.name)
            yield event

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
            abandon_after_s=self.abandon_after_s,
            name=f"tool calls of run {run.run_id}",
            fields={"run_id": run.run_id},
        )
        async for event in calls_of_turn:
            yield event
