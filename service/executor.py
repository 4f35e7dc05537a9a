"""Runs one tool call under its policy and yields its events: `tool_call_ready`, then any `tool_result_chunk`,
`tool_retry`, `tool_fallback` and `execution_failed`, then one `tool_result`. The stages, in order:

    admit        unknown tool, bad JSON, input validation, `requires`  → rejected (the tool never runs)  policy/admit
    approval     the call waits for a decision when policy says so     → denied (never runs)   service/approvals
    cache        idempotent tools, per input, for a TTL                → ok, cache_hit               policy/pipeline
    rate limit   wait up to max_wait, or reject                        → rate_limited                policy/guarded
    breaker      checked before every attempt                          → circuit_open                policy/guarded
    timeout      hard: cancel; soft: a streaming tool's chunks so far  → timeout / partial           policy/attempt
    retry        retryable failures, backoff with jitter               → tool_retry before each wait policy/guarded
    fallback     on final failure or open circuit, same input          → tool_fallback, answered_by  policy/fallback
    dead letter  every call that finally failed, stored durably        → execution_failed            recording

The policy stages are built once per tool (`policy/pipeline.py` composes them). Each call is audited, counted, traced
(span `tool_call`, children for retries and the fallback) and logged by its `CallRecord` (`recording.py`), the one
observer the executor and the stages notify; what is recorded is redacted (`redact.py`), what the model and the
caller get is not.
Whatever the tool does, the call ends in a `ToolResult` the model can read; only cancellation propagates, and a
`CancelledError` is never swallowed (a half-open breaker's trial slot is released on the way out, by the call that
holds it).

Each attempt runs with `tools.base.current_call()` naming its call; the call's idempotency key, `run_id:call_id`, is
the same for every attempt and the fallback. `resume` is for a call a crash cut off: run again only if safe to repeat
(`policy/repeat.py`), otherwise ended `outcome_unknown`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

from service.approvals import Approvals, Approved
from service.events import Event, ToolCallReady, ToolResult
from service.events import ToolStatus as S
from service.policy.admit import admit, describe
from service.policy.attempt import Outcome, to_json
from service.policy.call import RunContext, ToolCallRequest
from service.policy.config import resolve
from service.policy.guards import Guards, build_guards
from service.policy.pipeline import Pipeline
from service.policy.repeat import INTERRUPTED, outcome_unknown, repeat_safe
from service.policy.shared import SharedPolicy
from service.recording import DEAD_LETTER_ON, Recorder
from service.records.stores import AuditSink, DeadLetterSink
from service.redact import Redactor
from tools.base import Tool
from tools.policy import ToolPolicy

__all__ = ["Executor", "RunContext", "ToolCallRequest", "describe", "to_json"]


class Executor:
    """Executes tool calls against a fixed set of tools, each under its policy (the tool's own, unless `policies`
    gives the resolved ones). `shared` is the fleet's state for limits, breakers and caches (None: this process's
    own; the executor closes it), on its own clock unless `shared_clock` is given. `clock` and `sleep` are injectable
    for tests; `audit` and `dead_letter` are optional so that unit tests need no files."""

    def __init__(
        self,
        tools: Mapping[str, Tool[Any]],
        *,
        timeout_s: float = 30.0,
        policies: Mapping[str, ToolPolicy] | None = None,
        audit: AuditSink | None = None,
        dead_letter: DeadLetterSink | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        shared: SharedPolicy | None = None,
        shared_clock: Callable[[], float] | None = None,
        redactor: Redactor | None = None,
        approvals: Approvals | None = None,
    ) -> None:
        self.tools = tools
        self.approvals = approvals
        self.timeout_s = timeout_s
        self.clock = clock
        self.sleep = sleep
        self.policies = dict(policies) if policies is not None else resolve(tools, {})
        self.guards = {
            name: build_guards(
                name,
                p,
                default_timeout_s=timeout_s,
                shared=shared,
                shared_clock=shared_clock,
                clock=clock,
                sleep=sleep,
            )
            for name, p in self.policies.items()
        }
        self.pipelines = {
            name: Pipeline(tools[name], guards, self._fallback(guards.policy.fallback))
            for name, guards in self.guards.items()
            if name in tools
        }
        self.shared = shared
        self.recorder = Recorder(
            tools, self.guards, audit=audit, dead_letter=dead_letter, redactor=redactor, clock=clock
        )

    def _fallback(self, name: str | None) -> tuple[Tool[Any], Guards] | None:
        """The tool and guards of the fallback a policy names (`resolve` checked that it names another tool)."""
        if name is None or name not in self.tools or name not in self.guards:
            return None
        return self.tools[name], self.guards[name]

    @property
    def audit(self) -> AuditSink | None:
        return self.recorder.audit

    @property
    def dead_letter(self) -> DeadLetterSink | None:
        return self.recorder.dead_letter

    @property
    def redactor(self) -> Redactor:
        return self.recorder.redactor

    async def aclose(self) -> None:
        """Flush the audit queue and close the stores."""
        await self.recorder.aclose()
        if self.shared is not None:
            await self.shared.aclose()

    async def execute(self, call: ToolCallRequest, run: RunContext) -> AsyncIterator[Event]:
        """The call's events, ending with its one `ToolResult`; recorded whatever happens."""
        record = self.recorder.start(call, run)
        result: ToolResult | None = None
        try:
            admitted = admit(call, run, self.tools, self.policies)
            if isinstance(admitted, Outcome):
                outcome = admitted
            else:
                tool, args = admitted
                yield ToolCallReady(call_id=call.call_id, name=call.name, input=call.input)
                denied: Outcome | None = None
                if self.approvals is not None:
                    async for step in self.approvals.review(call, tool, args, run):
                        if isinstance(step, Outcome):
                            denied = step
                        elif isinstance(step, Approved):
                            call, args = step.call, step.args  # an approver's edit, validated again
                        else:
                            yield step
                if denied is not None:
                    outcome = denied
                else:
                    if run.journal is not None and not self.repeat_safe(call):
                        # after its approval: a crash while it waited is no unknown outcome
                        await run.journal.intend(call)
                    pipeline = self.pipelines[tool.name]
                    first = await pipeline.first(call, run, args, record) if pipeline.quick else None
                    if first is not None and pipeline.done(first):
                        outcome = first  # the common call: no generator below this one (policy/pipeline.py)
                    else:
                        outcome = Outcome(S.ERROR)
                        async for item in pipeline.run(call, run, args, record, self.sleep, first=first):
                            if isinstance(item, Outcome):
                                outcome = item
                            else:
                                yield item
                # `is not OK` first: a success skips hashing the status (Enum.__hash__ is Python code)
                if outcome.status is not S.OK and outcome.status in DEAD_LETTER_ON:
                    failed = await record.dead_letter(outcome)
                    if failed is not None:
                        yield failed
            result = ToolResult(
                call_id=call.call_id,
                name=call.name,
                status=outcome.status,
                duration_s=record.elapsed(),
                data=outcome.data if outcome.ok else None,
                error=outcome.error,
                attempts=outcome.attempts,
                cache_hit=outcome.cache_hit,
                answered_by=outcome.answered_by,
            )
            await record.finished(result)
            yield result
        except BaseException as exc:  # cancelled, or the consumer closed the stream: still audited and counted
            record.aborted(result, exc)
            raise
        record.ended(result)

    def repeat_safe(self, call: ToolCallRequest) -> bool:
        """Whether `call` may be run again without risking its side effect twice (its tool's `side_effects`)."""
        return repeat_safe(call, self.tools, self.policies)

    async def resume(
        self, call: ToolCallRequest, run: RunContext, *, why: str = INTERRUPTED, attempts: int = 1
    ) -> AsyncIterator[Event]:
        """The events of a call that `why` cut off before its result was recorded, after `attempts` had started.
        A call safe to repeat runs again, as `execute` runs it, with the same idempotency key. Any other is not sent
        again: its result is `outcome_unknown`, audited, counted and dead-lettered for reconciliation like a call
        that failed. (Recovery of durable runs will call this; nothing else does.)"""
        if self.repeat_safe(call):
            async for event in self.execute(call, run):
                yield event
            return
        record = self.recorder.start(call, run)
        result = outcome_unknown(call.call_id, call.name, why=why, attempts=attempts)
        try:
            failed = await record.dead_letter(
                Outcome(result.status, error=result.error, error_type="OutcomeUnknown", attempts=attempts)
            )
            if failed is not None:
                yield failed
            await record.finished(result)
            yield result
        except BaseException as exc:
            record.aborted(None, exc)
            raise
        record.ended(result)
