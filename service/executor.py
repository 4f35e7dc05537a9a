"""Runs one tool call under its policy and yields its events: `tool_call_ready`, then any `tool_result_chunk`,
`tool_retry`, `tool_fallback` and `execution_failed`, then one `tool_result`. The stages, in order:

    admit       unknown tool, bad JSON, input validation, `requires`  → rejected (the tool never runs)
    cache       idempotent tools, per input, for a TTL                → ok, cache_hit
    rate limit  wait up to max_wait, or reject                        → rate_limited
    breaker     checked before every attempt                          → circuit_open
    timeout     hard: cancel; soft: a streaming tool's chunks so far  → timeout / partial
    retry       retryable failures, backoff with jitter               → tool_retry before each wait
    fallback    on final failure or open circuit, same input          → tool_fallback, answered_by
    dead letter every call that finally failed, stored durably        → execution_failed

and every call is audited, counted, traced (span `tool_call`, children for retries and the fallback) and logged;
what is recorded (span attributes, audit, dead letters, logs) is redacted (`service/redact.py`), what the model and
the caller get is not.
Whatever the tool does, the call ends in a `ToolResult` the model can read; only cancellation propagates, and a
`CancelledError` is never swallowed (a half-open breaker's trial slot is released on the way out, by the call that
holds it).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from pydantic import ValidationError

from service import redact, telemetry
from service.audit import AuditLog, AuditRecord
from service.deadletter import DeadLetterStore, capture
from service.events import Event, ExecutionFailed, ToolCallReady, ToolFallback, ToolResult, ToolResultChunk, ToolRetry
from service.events import ToolStatus as S
from service.policy.attempt import ChunkCounter, Outcome, attempt, to_json
from service.policy.breaker import BreakerStore, CircuitBreaker, State
from service.policy.cache import cache_key
from service.policy.config import resolve
from service.policy.guards import build_guards, rate_limit, unwell
from service.redact import Redactor, safe_json
from tools.base import Tool
from tools.policy import ToolPolicy

__all__ = ["Executor", "RunContext", "ToolCallRequest", "describe", "to_json"]

log = logging.getLogger(__name__)

_FALLBACK_ON = frozenset({S.ERROR, S.TIMEOUT, S.CIRCUIT_OPEN})
_DEAD_LETTER_ON = frozenset({S.ERROR, S.TIMEOUT})
_SPAN_INPUT_CHARS = 1024  # tool input on a span: enough to read, bounded whatever the model sends


@dataclass(frozen=True, kw_only=True, slots=True)
class RunContext:
    """What the executor knows of the run a call belongs to: for audit, dead-letter, logs, traces and `requires`."""

    run_id: str
    offered: frozenset[str]
    metadata: Mapping[str, str] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)  # tools that have returned OK in this run
    trace_context: otel_context.Context | None = None  # the run's span: parent of every tool_call span
    remaining: Callable[[], float | None] | None = None  # seconds to the run's deadline (None: no deadline)


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallRequest:
    """One tool_use block of a model turn. `parse_error` is set when the model's input cannot be used (its JSON did
    not parse or is not an object, or the turn ended before it was complete): a whole sentence the model reads as the
    call's error, as the adapter wrote it."""

    call_id: str
    name: str
    input: dict[str, Any]
    parse_error: str | None = None


class Executor:
    """Executes tool calls against a fixed set of tools, each under its policy (the tool's own, unless `policies`
    gives the resolved ones). `clock`, `sleep` and `breaker_store` are injectable for tests; `audit` and
    `dead_letter` are optional so that unit tests need no files."""

    def __init__(
        self,
        tools: Mapping[str, Tool[Any]],
        *,
        timeout_s: float = 30.0,
        policies: Mapping[str, ToolPolicy] | None = None,
        audit: AuditLog | None = None,
        dead_letter: DeadLetterStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        breaker_store: BreakerStore | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.tools = tools
        self._redactor = redactor  # None: the process-wide one
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep
        self.audit = audit
        self.dead_letter = dead_letter
        self.policies = dict(policies) if policies is not None else resolve(tools, {})
        self.guards = {
            name: build_guards(name, p, default_timeout_s=timeout_s, store=breaker_store, clock=clock, sleep=sleep)
            for name, p in self.policies.items()
        }

    async def aclose(self) -> None:
        """Flush the audit queue and close the stores (on the stores' threads: closing waits for writes)."""
        for store in (self.audit, self.dead_letter):
            if store is not None:
                await asyncio.to_thread(store.close)

    @property
    def redactor(self) -> Redactor:
        return self._redactor or redact.active()

    async def execute(self, call: ToolCallRequest, run: RunContext) -> AsyncIterator[Event]:
        started = self.clock()
        span = telemetry.tracer().start_span("tool_call", context=run.trace_context)
        if span.is_recording():
            span.set_attributes(
                {
                    "tool.name": call.name,
                    "tool.call_id": call.call_id,
                    "run.id": run.run_id,
                    "tool.input": safe_json(self.redactor.value(call.input), limit=_SPAN_INPUT_CHARS),
                }
            )
        result: ToolResult | None = None
        try:
            async for event in self._execute(call, run, span, started):
                if isinstance(event, ToolResult):
                    result = event
                    try:
                        if self.audit is not None and self.audit.full:
                            await self.audit.room()  # the audit writer is behind: this call waits, not the loop
                    finally:
                        self._account(call, run, span, event)
                yield event
        except BaseException as exc:  # cancelled, or the consumer closed the stream: still audited and counted
            if result is None:
                cancelled = ToolResult(
                    call_id=call.call_id, name=call.name, status=S.CANCELLED, duration_s=self.clock() - started
                )
                self._account(call, run, span, cancelled)
                telemetry.end_span(
                    span,
                    "cancelled" if isinstance(exc, asyncio.CancelledError | GeneratorExit) else exc,
                    self.redactor,
                )
            else:  # closed while its result was held: the call ended as the result says
                telemetry.end_span(span, _failure(result), self.redactor)
            raise
        telemetry.end_span(span, _failure(result), self.redactor)

    async def _execute(
        self, call: ToolCallRequest, run: RunContext, span: trace.Span, started: float
    ) -> AsyncIterator[Event]:
        def result(outcome: Outcome, *, cache_hit: bool = False, answered_by: str = "") -> ToolResult:
            data = outcome.data if outcome.ok else None
            return ToolResult(
                call_id=call.call_id,
                name=call.name,
                status=outcome.status,
                duration_s=self.clock() - started,
                data=data,
                error=outcome.error,
                attempts=outcome.attempts,
                cache_hit=cache_hit,
                answered_by=answered_by,
            )

        admitted = self._admit(call, run)
        if isinstance(admitted, Outcome):
            yield result(admitted)
            return
        tool, args = admitted
        guards = self.guards[tool.name]

        yield ToolCallReady(call_id=call.call_id, name=call.name, input=call.input)
        key = None
        if guards.cache is not None:
            key = cache_key(tool.name, args)
            hit, value = guards.cache.get(key)
            if hit:
                telemetry.CACHE_HITS.labels(tool.name).inc()
                if tool.streaming:
                    total = len(value)
                    for i, chunk in enumerate(value):
                        yield ToolResultChunk(call_id=call.call_id, index=i, total=total, data=chunk)
                yield result(Outcome(S.OK, data=value), cache_hit=True)
                return

        counter = ChunkCounter()
        outcome = Outcome(S.ERROR)
        async for item in self._guarded(call.call_id, tool, args, span, counter, run):
            if isinstance(item, Outcome):
                outcome = item
            else:
                yield item
        answered_by = ""
        fallback = self._fallback_for(guards.policy.fallback, outcome, run)
        if fallback is not None:
            async for item in self._fallback(call, run, fallback, outcome, span, counter):
                if isinstance(item, Outcome):
                    answered_by = fallback if item is not outcome else ""
                    outcome = item
                else:
                    yield item
        if key is not None and guards.cache is not None and outcome.status is S.OK and not answered_by:
            guards.cache.put(key, outcome.data)
        if outcome.status in _DEAD_LETTER_ON and self.dead_letter is not None:
            failed = await self._dead_letter(call, run, outcome)
            if failed is not None:
                yield failed
        yield result(outcome, answered_by=answered_by)

    def _admit(self, call: ToolCallRequest, run: RunContext) -> tuple[Tool[Any], Any] | Outcome:
        """The tool and its validated input, or why the call is refused before it runs (status rejected)."""
        tool = self.tools.get(call.name) if call.name in run.offered else None
        if tool is None:
            available = ", ".join(sorted(run.offered)) or "none"
            return Outcome(S.REJECTED, error=f"unknown tool {call.name!r}; available tools: {available}")
        if call.parse_error is not None:
            return Outcome(S.REJECTED, error=call.parse_error)
        try:
            args = tool.validate(call.input)
        except Exception as exc:
            return Outcome(S.REJECTED, error=f"invalid input for {call.name}: {invalid(exc, call.name)}")
        missing = self._missing(tool.name, run)
        if missing:
            needed = ", ".join(missing)
            return Outcome(
                S.REJECTED,
                error=f"{call.name} can only run after {needed} succeeded in this run: call {missing[0]} first",
            )
        return tool, args

    def _missing(self, tool: str, run: RunContext) -> list[str]:
        """The tools `tool` requires that have not succeeded in this run yet."""
        return [name for name in self.guards[tool].policy.requires if name not in run.succeeded]

    def _fallback_for(self, fallback: str | None, outcome: Outcome, run: RunContext) -> str | None:
        """The fallback to try after `outcome`, if any. One the run was not offered is not tried (the caller's rights,
        or its own choice of tools, leave it out: answering through it would hand the caller a tool it may not call),
        nor one whose own `requires` have not succeeded in this run (called directly, it would be refused)."""
        if fallback is None or outcome.status not in _FALLBACK_ON:
            return None
        if fallback not in run.offered:
            outcome.error += f"; fallback {fallback} is not offered to this run, so it was not tried"
            return None
        missing = self._missing(fallback, run)
        if missing:
            outcome.error += (
                f"; fallback {fallback} can only run after {', '.join(missing)} succeeded, so it was not tried"
            )
            return None
        return fallback

    async def _guarded(
        self, call_id: str, tool: Tool[Any], args: Any, span: trace.Span, counter: ChunkCounter, run: RunContext
    ) -> AsyncIterator[Event | Outcome]:
        """Rate limit, then attempts under breaker and timeout, retried with backoff: events, then one Outcome."""
        guards = self.guards[tool.name]
        policy = guards.policy
        if guards.limiter is not None:
            refused = await rate_limit(tool.name, guards.limiter)
            if refused is not None:
                yield refused
                return
        attempts = policy.retry.attempts
        outcome = Outcome(S.ERROR)
        for number in range(1, attempts + 1):
            breaker = guards.breaker
            permit = breaker.allow() if breaker is not None else None
            if breaker is not None and permit is None:
                if number > 1:  # refused while this call waited to retry: the failure it had is its answer
                    outcome.error += f"; not retried: {tool.name}'s circuit refused the call ({breaker.state.value})"
                    yield outcome
                    return
                yield Outcome(
                    S.CIRCUIT_OPEN,
                    error=f"{tool.name} is unavailable (circuit open after repeated failures); try another approach",
                    attempts=number - 1,
                )
                return
            attempt_span = span
            if number > 1:
                parent = trace.set_span_in_context(span)
                attempt_span = telemetry.tracer().start_span("tool_retry", context=parent)
                attempt_span.set_attribute("tool.attempt", number)
            chunks_before = counter.n
            try:
                async for item in attempt(
                    tool,
                    args,
                    call_id=call_id,
                    timeout_s=guards.timeout_s,
                    mode=policy.timeout.mode,
                    retry_timeouts=policy.retry.on_timeout,
                    counter=counter,
                ):
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        yield item
            except BaseException as exc:
                if breaker is not None and permit is not None:
                    breaker.release(permit)
                if attempt_span is not span:
                    telemetry.end_span(attempt_span, exc)
                raise
            outcome.attempts = number
            if breaker is not None and permit is not None:
                breaker.failure(permit) if unwell(outcome) else breaker.success(permit)
            _end_attempt(attempt_span, span, outcome, breaker, self.redactor)
            final = outcome.ok or not outcome.retryable or number == attempts
            if final or counter.n > chunks_before:  # chunks already reached the caller: a retry would repeat them
                yield outcome
                return
            wait = guards.backoff.wait(number)
            why = _not_retried(tool.name, breaker, wait, run)
            if why is not None:  # this failure is the call's answer
                outcome.error += f"; not retried: {why}"
                yield outcome
                return
            telemetry.TOOL_RETRIES.labels(tool.name).inc()
            log.warning(
                "tool call failed, retrying",
                extra={
                    "tool": tool.name,
                    "call_id": call_id,
                    "attempt": number,
                    "max_attempts": attempts,
                    "wait_s": round(wait, 3),
                    "error": outcome.error,
                    **telemetry.span_ids(span),
                },
            )
            yield ToolRetry(call_id=call_id, attempt=number, max_attempts=attempts, wait_s=wait, error=outcome.error)
            await self.sleep(wait)
        yield outcome

    async def _fallback(
        self,
        call: ToolCallRequest,
        run: RunContext,
        name: str,
        failed: Outcome,
        span: trace.Span,
        counter: ChunkCounter,
    ) -> AsyncIterator[Event | Outcome]:
        """The fallback tool with the same input, under its own policy (but never its own fallback: no chains). Ends
        with the fallback's outcome when it answered, else with `failed`, its error saying why that did not help."""
        tool = self.tools[name]
        try:
            args = tool.validate(call.input)
        except Exception as exc:
            failed.error += f"; fallback {name} cannot take this input ({invalid(exc, name)})"
            yield failed
            return
        telemetry.FALLBACKS.labels(call.name, name).inc()
        log.warning(
            "tool call falls back",
            extra={"tool": call.name, "fallback": name, "call_id": call.call_id, "reason": failed.error},
        )
        yield ToolFallback(call_id=call.call_id, primary=call.name, fallback=name, reason=failed.error)
        fallback_span = telemetry.tracer().start_span("tool_fallback", context=trace.set_span_in_context(span))
        fallback_span.set_attribute("tool.name", name)
        outcome = Outcome(S.ERROR)
        try:
            async for item in self._guarded(call.call_id, tool, args, fallback_span, counter, run):
                if isinstance(item, Outcome):
                    outcome = item
                else:
                    yield item
        except BaseException as exc:
            telemetry.end_span(fallback_span, exc)
            raise
        fallback_span.set_attribute("tool.status", outcome.status.value)
        telemetry.end_span(fallback_span, None if outcome.ok else outcome.error)
        if outcome.ok:
            outcome.attempts += failed.attempts
            yield outcome
        else:
            failed.error += f"; fallback {name} also failed: {outcome.error}"
            yield failed

    async def _dead_letter(self, call: ToolCallRequest, run: RunContext, outcome: Outcome) -> ExecutionFailed | None:
        assert self.dead_letter is not None
        letter = await capture(
            self.dead_letter,
            run_id=run.run_id,
            call_id=call.call_id,
            tool=call.name,
            input=call.input,
            status=outcome.status.value,
            error_type=outcome.error_type or outcome.status.value,
            message=outcome.error,
            traceback=outcome.traceback,
            attempts=outcome.attempts,
        )
        if letter is None:
            return None
        message = f"{call.name} failed after {outcome.attempts} attempt(s): {outcome.error}"
        return ExecutionFailed(execution_id=letter.execution_id, call_id=call.call_id, tool=call.name, message=message)

    def _account(self, call: ToolCallRequest, run: RunContext, span: trace.Span, result: ToolResult) -> None:
        """Metrics, audit, span attributes and the log line of a finished call."""
        label = call.name if call.name in self.tools else telemetry.UNKNOWN_TOOL
        telemetry.record_tool_call(label, result.status.value, result.duration_s)
        if self.audit is not None:
            self.audit.append(
                AuditRecord(
                    ts=time.time(),
                    run_id=run.run_id,
                    metadata=dict(run.metadata),
                    tool=call.name,
                    call_id=call.call_id,
                    input=call.input,
                    status=result.status.value,
                    duration_s=result.duration_s,
                    attempts=result.attempts,
                    cache_hit=result.cache_hit,
                    answered_by=result.answered_by,
                    data=result.data,
                    error=result.error,
                )
            )
        guards = self.guards.get(call.name)
        breaker = guards.breaker if guards is not None else None
        if span.is_recording():
            span.set_attributes(
                {
                    "tool.status": result.status.value,
                    "tool.attempts": result.attempts,
                    "tool.cache_hit": result.cache_hit,
                    "tool.answered_by": result.answered_by,
                    "tool.breaker_state": breaker.state.value if breaker is not None else "none",
                }
            )
            if result.error:
                span.set_attribute("tool.error", self.redactor.text(result.error))
        slow = guards.policy.slow_s if guards is not None else None
        is_slow = slow is not None and result.duration_s > slow
        if not (is_slow or log.isEnabledFor(logging.INFO)):
            return
        fields = {
            "run_id": run.run_id,
            "tool": call.name,
            "call_id": call.call_id,
            "status": result.status.value,
            "attempts": result.attempts,
            "elapsed_ms": round(result.duration_s * 1000, 1),
            **telemetry.span_ids(span),
        }
        if result.error:
            fields["error"] = result.error
        log.info("tool call ended", extra=fields)
        if is_slow:
            log.warning("tool call slow", extra={**fields, "slow_s": slow})


def _not_retried(tool: str, breaker: CircuitBreaker | None, wait: float, run: RunContext) -> str | None:
    """Why a retryable failure is not retried after all, or None: the failure opened the circuit (the retry would be
    refused), or the run's deadline comes before the backoff ends (the run would be stopped while waiting, and the
    call end CANCELLED instead of with its error)."""
    if breaker is not None and breaker.state is State.OPEN:
        return f"{tool}'s circuit opened"
    left = run.remaining() if run.remaining is not None else None
    if left is not None and wait >= left:
        return f"the run's deadline is {max(left, 0):.2f} s away, the backoff {wait:.2f} s"
    return None


def _failure(result: ToolResult | None) -> str | None:
    """The error status text of a call's span, None when it succeeded."""
    return None if result is None or result.ok else f"{result.status.value}: {result.error}"


def _end_attempt(
    attempt_span: trace.Span,
    call_span: trace.Span,
    outcome: Outcome,
    breaker: CircuitBreaker | None,
    redactor: Redactor,
) -> None:
    if attempt_span.is_recording():
        attempt_span.set_attribute("tool.attempt", outcome.attempts)
        attempt_span.set_attribute("tool.status", outcome.status.value)
        if breaker is not None:
            attempt_span.set_attribute("tool.breaker_state", breaker.state.value)
    if attempt_span is not call_span:  # the first attempt runs in the call's own span, ended by execute()
        telemetry.end_span(attempt_span, None if outcome.ok else outcome.error, redactor)
    elif not outcome.ok and call_span.is_recording():
        # the call's span ends with the final result's status: a failed first attempt that a retry made good would
        # otherwise leave no trace of its error in it
        call_span.add_event(
            "tool.attempt_failed",
            {
                "tool.attempt": outcome.attempts,
                "tool.status": outcome.status.value,
                "error": redactor.text(outcome.error),
            },
        )


def invalid(exc: Exception, tool: str) -> str:
    """Why `tool.validate` refused an input, for the model. Not only pydantic errors: input nested deeper than the
    validator goes raises RecursionError, and a tool's own rules may raise anything; none of it may end the run."""
    if isinstance(exc, ValidationError):
        return describe(exc)
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply"
    if not isinstance(exc, ValueError | TypeError):
        log.exception("validating input for %s raised", tool)
    return f"{type(exc).__name__}: {exc}"[:500]


def describe(exc: ValidationError) -> str:
    """Pydantic errors as one line the model can act on: `limit: Input should be less than or equal to 1000`."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if len(loc) > 8:  # deeply nested input: the path's ends say where, the middle would be kilobytes
            loc = [*loc[:3], "…", *loc[-3:]]
        parts.append(f"{'.'.join(loc) or 'input'}: {err['msg']}")
    return "; ".join(parts)[:2000]
