"""The fallback stage: when a tool finally fails (error, timeout, open circuit), its policy's fallback tool is tried
with the same input, under its own guards but never its own fallback (no chains)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.events import Event, ToolFallback
from service.events import ToolStatus as S
from service.policy.admit import invalid, missing
from service.policy.attempt import ChunkCounter, Outcome
from service.policy.call import RunContext, ToolCallRequest
from service.policy.guarded import guarded
from service.policy.guards import Guards
from service.policy.observer import CallObserver
from tools.base import Tool

FALLBACK_ON = frozenset({S.ERROR, S.TIMEOUT, S.CIRCUIT_OPEN})


def usable(name: str, guards: Guards, failed: Outcome, run: RunContext) -> bool:
    """Whether to try fallback `name` after `failed`. One the run was not offered is not tried (the caller's rights,
    or its own choice of tools, leave it out: answering through it would hand the caller a tool it may not call),
    nor one whose own `requires` have not succeeded in this run (called directly, it would be refused); `failed`'s
    error then says why."""
    if failed.status not in FALLBACK_ON:
        return False
    if name not in run.offered:
        failed.error += f"; fallback {name} is not offered to this run, so it was not tried"
        return False
    needed = missing(guards.policy, run)
    if needed:
        failed.error += f"; fallback {name} can only run after {', '.join(needed)} succeeded, so it was not tried"
        return False
    return True


async def fall_back(
    tool: Tool[Any],
    guards: Guards,
    *,
    call: ToolCallRequest,
    run: RunContext,
    failed: Outcome,
    counter: ChunkCounter,
    observer: CallObserver,
    sleep: Callable[[float], Awaitable[None]],
) -> AsyncIterator[Event | Outcome]:
    """Events, then the fallback's outcome (`answered_by` set) when it answered, else `failed`, its error saying why
    the fallback did not help."""
    name = tool.name
    try:
        args = tool.validate(call.input)
    except Exception as exc:
        failed.error += f"; fallback {name} cannot take this input ({invalid(exc, name)})"
        yield failed
        return
    observer.fallback_started(call.name, name, failed.error)
    outcome = Outcome(S.ERROR)
    try:
        yield ToolFallback(call_id=call.call_id, primary=call.name, fallback=name, reason=failed.error)
        async for item in guarded(
            tool,
            args,
            guards,
            run_id=run.run_id,
            call_id=call.call_id,
            counter=counter,
            observer=observer,
            remaining=run.remaining,
            sleep=sleep,
        ):
            if isinstance(item, Outcome):
                outcome = item
            else:
                yield item
    except BaseException as exc:
        observer.fallback_ended(exc)
        raise
    observer.fallback_ended(outcome)
    if outcome.ok:
        outcome.attempts += failed.attempts
        outcome.answered_by = name
        yield outcome
    else:
        failed.error += f"; fallback {name} also failed: {outcome.error}"
        yield failed
