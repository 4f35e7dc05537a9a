"""The record of every tool call: metrics, the `tool_call` span (a child per retry, one for the fallback), the audit
record, the dead letter of a call that finally failed, and the log lines. One `Recorder` per executor; each call gets
a `CallRecord`, the one observer that the executor and the policy stages notify. What is recorded is redacted
(`service/redact.py`); what the model and the caller get is not."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from opentelemetry import trace

from service import redact, telemetry
from service.events import ExecutionFailed, ToolResult
from service.events import ToolStatus as S
from service.policy.attempt import Outcome
from service.policy.call import RunContext, ToolCallRequest
from service.policy.fleet_breaker import Breaker
from service.policy.guards import Guards
from service.records.audit import AuditRecord
from service.records.deadletter import capture
from service.records.stores import AuditSink, DeadLetterSink
from service.redact import Redactor, safe_json
from tools.base import Tool

# Named for the executor, not this module: these are the executor's lines, the logger operators configure for them.
log = logging.getLogger("service.executor")

DEAD_LETTER_ON = frozenset({S.ERROR, S.TIMEOUT})
_SPAN_INPUT_CHARS = 1024  # tool input on a span: enough to read, bounded whatever the model sends


class Recorder:
    """Where calls are recorded. `audit` and `dead_letter` are optional so that unit tests need no files; `redactor`
    None means the process-wide one. The tools' guards give a call's span its breaker state and its log line the
    tool's `slow_s`."""

    def __init__(
        self,
        tools: Mapping[str, Tool[Any]],
        guards: Mapping[str, Guards],
        *,
        audit: AuditSink | None,
        dead_letter: DeadLetterSink | None,
        redactor: Redactor | None,
        clock: Callable[[], float],
    ) -> None:
        self.tools = tools
        self.guards = guards
        self.audit = audit
        self.dead_letter = dead_letter
        self._redactor = redactor
        self.clock = clock

    @property
    def redactor(self) -> Redactor:
        return self._redactor or redact.active()

    def start(self, call: ToolCallRequest, run: RunContext) -> CallRecord:
        """A call begins: its clock starts and its span opens, under the run's."""
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
        return CallRecord(self, call, run, span, started)

    async def aclose(self) -> None:
        """Flush the audit queue and close the stores (closing waits for their writes)."""
        if self.audit is not None:
            await self.audit.aclose()
        if self.dead_letter is not None:
            await self.dead_letter.aclose()


class CallRecord:
    """One call's recording. Its attempts run in the span of the call (or, once it falls back, of the fallback);
    a retry's attempt in a child span of its own."""

    __slots__ = ("_attempt", "_parent", "_recorder", "call", "run", "span", "started")

    def __init__(
        self, recorder: Recorder, call: ToolCallRequest, run: RunContext, span: trace.Span, started: float
    ) -> None:
        self._recorder = recorder
        self.call = call
        self.run = run
        self.span = span
        self.started = started
        self._parent = span  # where attempts run: the call's span, or the fallback's
        self._attempt = span

    # what the policy stages tell (service.policy.observer.CallObserver)

    def cache_hit(self, tool: str) -> None:
        telemetry.CACHE_HITS.labels(tool).inc()

    def rate_limited(self, tool: str, waited: float | None) -> None:
        if waited is None:
            telemetry.RATE_LIMITED.labels(tool).inc()
        else:
            telemetry.tallied(telemetry.RATE_LIMIT_WAIT, tool).observe(waited)

    def attempt_started(self, number: int) -> None:
        if number == 1:
            self._attempt = self._parent
            return
        self._attempt = telemetry.tracer().start_span("tool_retry", context=trace.set_span_in_context(self._parent))
        self._attempt.set_attribute("tool.attempt", number)

    def attempt_aborted(self, exc: BaseException) -> None:
        if self._attempt is not self._parent:
            telemetry.end_span(self._attempt, exc)

    def attempt_ended(self, outcome: Outcome, breaker: Breaker | None) -> None:
        span, parent = self._attempt, self._parent
        if span.is_recording():
            span.set_attribute("tool.attempt", outcome.attempts)
            span.set_attribute("tool.status", outcome.status.value)
            if breaker is not None:
                span.set_attribute("tool.breaker_state", breaker.state.value)
        if span is not parent:  # the first attempt runs in its parent's span, which ends with the call (or fallback)
            telemetry.end_span(span, None if outcome.ok else outcome.error, self._recorder.redactor)
        elif not outcome.ok and parent.is_recording():
            # the parent ends with the final result's status: a failed first attempt that a retry made good would
            # otherwise leave no trace of its error in it
            parent.add_event(
                "tool.attempt_failed",
                {
                    "tool.attempt": outcome.attempts,
                    "tool.status": outcome.status.value,
                    "error": self._recorder.redactor.text(outcome.error),
                },
            )

    def retrying(self, tool: str, number: int, attempts: int, wait: float, error: str) -> None:
        telemetry.TOOL_RETRIES.labels(tool).inc()
        log.warning(
            "tool call failed, retrying",
            extra={
                "tool": tool,
                "call_id": self.call.call_id,
                "attempt": number,
                "max_attempts": attempts,
                "wait_s": round(wait, 3),
                "error": error,
                **telemetry.span_ids(self._parent),
            },
        )

    def fallback_started(self, primary: str, fallback: str, reason: str) -> None:
        telemetry.FALLBACKS.labels(primary, fallback).inc()
        log.warning(
            "tool call falls back",
            extra={"tool": primary, "fallback": fallback, "call_id": self.call.call_id, "reason": reason},
        )
        self._parent = telemetry.tracer().start_span("tool_fallback", context=trace.set_span_in_context(self.span))
        self._parent.set_attribute("tool.name", fallback)

    def fallback_ended(self, outcome: Outcome | BaseException) -> None:
        span, self._parent = self._parent, self.span
        if isinstance(outcome, BaseException):
            telemetry.end_span(span, outcome)
            return
        span.set_attribute("tool.status", outcome.status.value)
        telemetry.end_span(span, None if outcome.ok else outcome.error)

    # what the executor tells

    def elapsed(self) -> float:
        """Seconds since the call began."""
        return self._recorder.clock() - self.started

    async def dead_letter(self, outcome: Outcome) -> ExecutionFailed | None:
        """Capture a call that finally failed; the event that says so, or None (no store, or the capture failed)."""
        store, call = self._recorder.dead_letter, self.call
        if store is None:
            return None
        letter = await capture(
            store,
            run_id=self.run.run_id,
            call_id=call.call_id,
            tool=call.name,
            input=call.input,
            status=outcome.status.value,
            error_type=outcome.error_type or outcome.status.value,
            message=outcome.error,
            traceback=outcome.traceback,
            attempts=outcome.attempts,
            trace_id=telemetry.span_ids(self.span).get("trace_id", ""),
        )
        if letter is None:
            return None
        message = f"{call.name} failed after {outcome.attempts} attempt(s): {outcome.error}"
        return ExecutionFailed(execution_id=letter.execution_id, call_id=call.call_id, tool=call.name, message=message)

    async def finished(self, result: ToolResult) -> None:
        """The call has its result: counted and audited before the caller gets it."""
        audit = self._recorder.audit
        try:
            if audit is not None and audit.full:
                await audit.room()  # the audit writer is behind: this call waits, not the loop
        finally:
            self._account(result)

    def ended(self, result: ToolResult) -> None:
        telemetry.end_span(self.span, _failure(result), self._recorder.redactor)

    def aborted(self, result: ToolResult | None, exc: BaseException) -> None:
        """Cancelled, or the consumer closed the stream: a call with no result yet is still audited and counted."""
        redactor = self._recorder.redactor
        if result is not None:  # closed while its result was held: the call ended as the result says
            telemetry.end_span(self.span, _failure(result), redactor)
            return
        call = self.call
        self._account(ToolResult(call_id=call.call_id, name=call.name, status=S.CANCELLED, duration_s=self.elapsed()))
        cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)
        telemetry.end_span(self.span, "cancelled" if cancelled else exc, redactor)

    def _account(self, result: ToolResult) -> None:
        """Metrics, audit, span attributes and the log line of a finished call."""
        call, run, span, recorder = self.call, self.run, self.span, self._recorder
        label = call.name if call.name in recorder.tools else telemetry.UNKNOWN_TOOL
        telemetry.record_tool_call(label, result.status.value, result.duration_s)
        if recorder.audit is not None:
            recorder.audit.append(
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
                    trace_id=telemetry.span_ids(span).get("trace_id", ""),
                )
            )
        guards = recorder.guards.get(call.name)
        if span.is_recording():
            breaker = guards.breaker if guards is not None else None
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
                span.set_attribute("tool.error", recorder.redactor.text(result.error))
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


def _failure(result: ToolResult | None) -> str | None:
    """The error status text of a call's span, None when it succeeded."""
    return None if result is None or result.ok else f"{result.status.value}: {result.error}"
