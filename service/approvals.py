"""Approvals of tool calls as policy: which calls wait for a decision (per tool: always, never, or a rule on the
validated input; per caller: `require_approval`), who may decide (the run's caller unless two-party control, and the
configured approvers), and what happens meanwhile. The call waits on a future of the run's `Inbox`, holding no core;
nobody deciding within `timeout_s` denies it. The model reads a denial as the call's result ("denied by <who>:
<reason>"). Every request and decision is audited with the identity that made it.

In a durable run the request (with its deadline) and the decision are checkpoints of the run's journal: a run resumed
after a restart asks again with the original deadline, or applies a recorded decision without asking
(docs/interactive.md, Durability).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Counter, Histogram
from pydantic import BaseModel

from service.config import ApprovalsConfig, CallerConfig
from service.config.approvals import Condition, ToolApproval
from service.events import ApprovalDecided, ApprovalRequired, Event
from service.events import ToolStatus as S
from service.interact import Decision, Inbox
from service.policy.attempt import Outcome
from service.policy.call import RunContext, ToolCallRequest
from service.records.rows import AuditRecord
from service.records.stores import AuditSink
from tools.base import Tool

APPROVALS = Counter(
    "agent_approvals_total", "Tool calls that needed approval, by tool and decision", ["tool", "decision"]
)
APPROVAL_WAIT = Histogram(
    "agent_approval_wait_seconds",
    "Time a call waited for its approval",
    buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600),
)
TIMEOUT = "timeout"
_WHO = {"approval_required": "asked_by", "approved": "decided_by", "denied": "decided_by"}


@dataclass(frozen=True, slots=True)
class Approved:
    """The go-ahead: the call runs with `call` and `args` (an edited input's, validated again)."""

    call: ToolCallRequest
    args: Any


def resolve_pointer(document: Any, pointer: str) -> tuple[bool, Any]:
    """RFC 6901: (found, value). Ten lines rather than a dependency: rules only ever read, never patch."""
    if pointer == "":
        return True, document
    value = document
    for token in pointer[1:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(value, dict) and token in value:
            value = value[token]
        elif isinstance(value, list) and token.isdigit() and int(token) < len(value):
            value = value[int(token)]
        else:
            return False, None
    return True, value


def holds(condition: Condition, document: Any) -> bool:
    found, value = resolve_pointer(document, condition.pointer)
    op, want = condition.op, condition.value
    if op == "exists":
        return found == (want is None or bool(want))
    if not found:
        return False
    try:
        match op:
            case "eq":
                return bool(value == want)
            case "ne":
                return bool(value != want)
            case "gt":
                return bool(value > want)
            case "ge":
                return bool(value >= want)
            case "lt":
                return bool(value < want)
            case "le":
                return bool(value <= want)
            case "in":
                return value in want
            case "not_in":
                return value not in want
            case "prefix":
                return isinstance(value, str) and value.startswith(want)
            case "not_prefix":
                return not (isinstance(value, str) and value.startswith(want))
            case "matches":
                return isinstance(value, str) and re.search(want, value) is not None
    except TypeError:
        return True  # a value the rule cannot compare (a string against a number): asking a person is the safe side
    return False


def why_needed(rule: ToolApproval | None, document: Any) -> str | None:
    """Why the tool's rule asks for approval of this input, or None."""
    if rule is None or rule.approval == "never":
        return None
    if rule.approval == "always":
        return "the tool's policy requires approval of every call"
    assert rule.when is not None
    for condition in rule.when.any:
        if holds(condition, document):
            return f"the input matches the approval rule: {condition.pointer} {condition.op} {condition.value!r}"
    if rule.when.all and all(holds(c, document) for c in rule.when.all):
        return "the input matches every condition of the approval rule"
    return None


class Approvals:
    """The approval policy of one server: `callers` by name (their `require_approval`), `clock` wall time."""

    def __init__(
        self,
        config: ApprovalsConfig,
        callers: Mapping[str, CallerConfig],
        *,
        audit: AuditSink | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.callers = callers
        self.audit = audit
        self.clock = clock
        self.approvers = frozenset(config.approvers)

    def reason(self, tool: str, document: Any, caller: str) -> str | None:
        """Why a call of `tool` with this (validated) input, in a run of `caller`, needs approval; None if not."""
        config = self.callers.get(caller)
        if config is not None and tool in config.require_approval:
            return f"caller {caller} needs approval for {tool}"
        return why_needed(self.config.tools.get(tool), document)

    def may_decide(self, caller: str) -> tuple[str, ...]:
        """Who may approve the calls of a run of `caller`."""
        own = () if self.config.two_party or caller in self.approvers else (caller,)
        return (*own, *sorted(self.approvers))

    def refuse(self, caller: str) -> Callable[[Decision], str | None]:
        def refused(decision: Decision) -> str | None:
            if decision.by in self.approvers:
                return None
            if decision.by != caller:
                return f"{decision.by} is neither this run's caller nor an approver"
            if decision.approved and self.config.two_party:
                return f"two-party control: {caller} cannot approve a call of its own run; an approver must"
            return None

        return refused

    async def review(
        self, call: ToolCallRequest, tool: Tool[Any], args: Any, run: RunContext
    ) -> AsyncIterator[Event | Outcome | Approved]:
        """Nothing when the call needs no approval; else `ApprovalRequired`, the wait, `ApprovalDecided`, and then
        `Approved` (run it) or the denial's `Outcome`. Cancelling the wait (CancelToolCall, the run's stop) ends it."""
        inbox: Inbox | None = run.inbox
        document = args.model_dump(mode="json") if isinstance(args, BaseModel) else call.input
        caller = run.metadata.get("caller", "")
        reason = self.reason(call.name, document, caller)
        if reason is None or inbox is None:
            return
        journal = run.journal
        decision = None if journal is None else journal.decided(call.call_id)
        if decision is None:
            async for step in self._wait(call, tool, run, inbox, document, reason):
                if isinstance(step, Decision):
                    decision = step
                else:
                    yield step
            assert decision is not None
            if journal is not None:
                await journal.decide(call.call_id, decision)  # before anyone hears of it, or the call goes on
            announce = True
        else:  # decided before a restart: applied again, nobody is asked again (its event resent if the crash lost it)
            announce = journal is not None and journal.unlogged(f"decided:{call.call_id}")
        edited = decision.edited_input
        if announce:
            APPROVALS.labels(call.name, _label(decision)).inc()
            status = "approved" if decision.approved else "denied"
            self._audit(run, call, edited or document, status, decision.by, decision.reason)
            yield ApprovalDecided(
                call_id=call.call_id,
                approved=decision.approved,
                decided_by=decision.by,
                reason=decision.reason,
                edited_input=edited,
            )
        if not decision.approved:
            why = f"denied by {decision.by}" + (f": {decision.reason}" if decision.reason else "")
            yield Outcome(S.DENIED, error=why, attempts=0)
        elif edited is not None:
            yield Approved(ToolCallRequest(call_id=call.call_id, name=call.name, input=edited), tool.validate(edited))
        else:
            yield Approved(call, args)

    async def _wait(
        self, call: ToolCallRequest, tool: Tool[Any], run: RunContext, inbox: Inbox, document: Any, reason: str
    ) -> AsyncIterator[Event | Decision]:
        """`ApprovalRequired`, then the `Decision` (a timeout's at the deadline). In a durable run the request and
        its deadline are committed before the wait, and a wait resumed after a restart asks again with the recorded
        deadline: it keeps counting from the first request."""
        caller = run.metadata.get("caller", "")
        journal = run.journal
        deadline = None if journal is None else journal.asked(call.call_id)
        if deadline is None:
            deadline = self.clock() + self.config.timeout_s
            if journal is not None:
                await journal.ask(call.call_id, deadline)
        future = inbox.expect(call.call_id, refuse=self.refuse(caller), validate=tool.validate)
        asked = time.monotonic()
        self._audit(run, call, document, "approval_required", caller, reason)
        yield ApprovalRequired(
            call_id=call.call_id,
            name=call.name,
            input=document,
            reason=reason,
            deadline=deadline,
            approvers=self.may_decide(caller),
        )
        try:
            decision = await asyncio.wait_for(future, max(0.0, deadline - self.clock()))
        except TimeoutError:
            decision = Decision(False, TIMEOUT, f"nobody decided within {self.config.timeout_s:g} s")
        finally:
            inbox.settled(call.call_id, TIMEOUT)  # a no-op once decided
        APPROVAL_WAIT.observe(time.monotonic() - asked)
        yield decision

    def _audit(self, run: RunContext, call: ToolCallRequest, document: Any, status: str, who: str, why: str) -> None:
        if self.audit is None:
            return
        self.audit.append(
            AuditRecord(
                ts=self.clock(),
                run_id=run.run_id,
                # the log keeps no error text: who and why go with the run's metadata, signed with the row
                metadata={**run.metadata, _WHO[status]: who, "approval_reason": why},
                tool=call.name,
                call_id=call.call_id,
                input=document,
                status=status,
                duration_s=0.0,
                attempts=0,
                cache_hit=False,
                answered_by="",
                error=why,
            )
        )


def _label(decision: Decision) -> str:
    if decision.approved:
        return "edited" if decision.edited_input is not None else "approved"
    return TIMEOUT if decision.by == TIMEOUT else "denied"
