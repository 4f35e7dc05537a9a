"""The agent loop: model turn → tool calls → results back to the model → next turn, until the model is done.

It yields domain events (`service.events`) and knows nothing of gRPC. Cancellation contract: cancelling the task
that iterates `AgentLoop.run` (or closing the generator) cancels the model stream and every running tool call, and
waits for them, before the CancelledError leaves the loop; the loop never swallows it. A stop asked through
`RunControl` (deadline, CancelRun) instead ends the run with events: CANCELLED results for the calls in flight,
then `RunFailed`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import aclosing
from dataclasses import dataclass, replace
from typing import Any

from service import telemetry
from service.aio import ABANDON_AFTER_S, merge
from service.config import ModelRetry
from service.control import RunControl
from service.durable.journal import Journal, recorded_results
from service.errors import (
    BudgetExceeded,
    DeadlineExceeded,
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
    Usage,
)
from service.executor import Executor, RunContext, ToolCallRequest
from service.model_turn import stream_turn
from service.models import base as m
from service.policy.retry import jittered_backoff
from service.spec import RunSpec as RunSpec  # where it was defined before: many import it from here
from tools.base import Tool

log = logging.getLogger(__name__)


@dataclass
class _Totals:
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: int = 0


class _RunState:
    """What one run accumulates: the conversation, totals, and the tool calls in flight."""

    def __init__(self, spec: RunSpec, *, started: float, control: RunControl) -> None:
        self.started = started
        self.history: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": spec.message}]}]
        self.totals = _Totals()
        self.context = RunContext(
            run_id=spec.run_id,
            offered=frozenset(spec.tools),
            metadata=spec.metadata,
            trace_context=spec.trace_context,
            remaining=control.remaining if control.deadline is not None else None,
        )
        self.open_calls: dict[str, str] = {}  # call id → tool name: begun (in the model's turn) and not ended
        self.tools_started = started
        self.paused = False  # the last turn ended with pause_turn (and asked for no tool call)

    def record(self, end: m.TurnEnd) -> list[dict[str, Any]]:
        """Add a model turn to the history and return the assistant message's content: the continuation of a paused
        turn is more of the same message (and its answer the text of all of it)."""
        if self.paused:  # a new message in its place: requests already made share the old one
            last = self.history[-1]
            self.history[-1] = {**last, "content": [*last["content"], *end.content]}
        else:
            self.history.append({"role": "assistant", "content": end.content})
        # A paused turn that asked for tools is a tool turn: left as it stands, its tool_use blocks would go back
        # without results, which the API refuses, and the caller would never see the calls end.
        self.paused = end.stop_reason == "pause_turn" and not any(b["type"] == "tool_use" for b in end.content)
        content: list[dict[str, Any]] = self.history[-1]["content"]
        return content


def check_budgets(spec: RunSpec, totals: _Totals, new_calls: int, control: RunControl) -> None:
    """Before a turn's tool calls start: refuse them when a per-run limit or the deadline says they cannot run."""
    if spec.max_tool_calls is not None and totals.tool_calls + new_calls > spec.max_tool_calls:
        raise BudgetExceeded(
            f"the model asked for {new_calls} more tool call(s) after {totals.tool_calls}; "
            f"max_tool_calls={spec.max_tool_calls}"
        )
    if spec.max_output_tokens is not None and totals.output_tokens > spec.max_output_tokens:
        raise BudgetExceeded(
            f"the run produced {totals.output_tokens} output tokens; max_output_tokens={spec.max_output_tokens}"
        )
    remaining = control.remaining()
    if remaining is not None and remaining < control.min_tool_budget_s:
        raise DeadlineExceeded(f"not starting {new_calls} tool call(s): only {max(remaining, 0):.3f} s left")


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
        state = _RunState(spec, started=self.clock(), control=control)
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
        self, spec: RunSpec, state: _RunState, control: RunControl, journal: Journal | None
    ) -> AsyncIterator[Event]:
        specs = self.tool_specs(spec.tools)
        totals = state.totals
        for turn in range(1, spec.max_turns + 1):
            end = None if journal is None else journal.turn(turn)
            if end is None:
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
                    await journal.turn_ended(turn, end)
                yield counted(turn, end, totals)
            else:  # recorded before a crash: not requested again, and its events are in the log already
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
            async for event in self._calls(turn, calls, state, results, journal):
                if isinstance(event, ToolResult):
                    results[event.call_id] = event
                    state.open_calls.pop(event.call_id, None)
                    if event.status is ToolStatus.OK:
                        state.context.succeeded.add(event.name)
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

    def _calls(
        self,
        turn: int,
        calls: Sequence[ToolCallRequest],
        state: _RunState,
        results: dict[str, ToolResult],
        journal: Journal | None,
    ) -> AsyncIterator[Event]:
        """The events of the calls of `turn`. In a durable run, those whose results were recorded before a crash
        go straight into `results` instead: not run again, and nothing of them is sent again."""
        if journal is None:
            return self.execute_tools(calls, state.context)
        for call_id, result in recorded_results(journal, calls).items():
            results[call_id] = result
            del state.open_calls[call_id]
            if result.status is ToolStatus.OK:
                state.context.succeeded.add(result.name)
        left = [c for c in calls if c.call_id not in results]
        return self.execute_durably(turn, left, state.context, journal)

    def execute_tools(self, calls: Sequence[ToolCallRequest], run: RunContext) -> AsyncIterator[Event]:
        """Run all calls of a turn concurrently; their events interleave, told apart by call id."""
        return self._merged([self.executor.execute(c, run) for c in calls], run)

    async def execute_durably(
        self, turn: int, calls: Sequence[ToolCallRequest], run: RunContext, journal: Journal
    ) -> AsyncIterator[Event]:
        """`execute_tools` for a durable run: the intents of the unsafe calls are committed before any call starts,
        and each result before it is passed on. A call whose intent was recorded before a crash (and no result) is
        resumed (`Executor.resume`): run again if it is safe to repeat, else `outcome_unknown`, never sent again."""
        executor = self.executor
        cut_off = {c.call_id for c in calls if journal.intended(c.call_id)}
        await journal.intend(turn, [c for c in calls if c.call_id not in cut_off and not executor.repeat_safe(c)])
        sources = [
            journal.recording(turn, executor.resume(c, run) if c.call_id in cut_off else executor.execute(c, run))
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


def stop_if_asked(control: RunControl) -> None:
    """At the end of a turn: raise the reason the run was asked to stop after it, if it was."""
    after_turn = control.after_turn_reason()
    if after_turn is not None:
        raise after_turn


def counted(turn: int, end: m.TurnEnd, totals: _Totals) -> Usage:
    """A model turn's tokens added to the run's totals, and the `Usage` event that says so."""
    totals.input_tokens += end.input_tokens
    totals.output_tokens += end.output_tokens
    telemetry.child(telemetry.MODEL_TOKENS, "input").inc(end.input_tokens)
    telemetry.child(telemetry.MODEL_TOKENS, "output").inc(end.output_tokens)
    return Usage(
        turn=turn,
        input_tokens=end.input_tokens,
        output_tokens=end.output_tokens,
        total_input_tokens=totals.input_tokens,
        total_output_tokens=totals.output_tokens,
    )


def tool_calls_of(end: m.TurnEnd) -> list[ToolCallRequest]:
    return [
        ToolCallRequest(call_id=b["id"], name=b["name"], input=b["input"], parse_error=end.bad_inputs.get(b["id"]))
        for b in end.content
        if b["type"] == "tool_use"
    ]


def not_run(call: ToolCallRequest, why: str) -> ToolResult:
    """The result of a call the loop did not run."""
    return ToolResult(
        call_id=call.call_id,
        name=call.name,
        status=ToolStatus.REJECTED,
        duration_s=0.0,
        error=f"not run: {why}",
        attempts=0,
    )


def tool_result_block(result: ToolResult) -> dict[str, Any]:
    """What the model reads: the data as JSON, or the error; a partial result says it is partial."""
    if result.status is ToolStatus.OK and result.answered_by:  # the model should know whose answer it reads
        body = json.dumps({"answered_by": result.answered_by, "data": result.data})
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": body}
    if result.status is ToolStatus.OK:
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": json.dumps(result.data)}
    if result.status is ToolStatus.PARTIAL:
        body = json.dumps({"partial": True, "note": result.error, "data": result.data})
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": body}
    if result.status is ToolStatus.OUTCOME_UNKNOWN:  # not a failure to work around: a side effect to check first
        text = m.plain_text(f"outcome unknown: {result.error}")
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": text, "is_error": True}
    # a tool's error may quote what it was given or read (a remote body, a program's stderr): it goes back as UTF-8
    text = m.plain_text(f"{result.status.value}: {result.error}")
    return {"type": "tool_result", "tool_use_id": result.call_id, "content": text, "is_error": True}
