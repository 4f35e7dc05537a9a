"""A tool's guarded run: rate limit once, then attempts, each let through by the circuit breaker and bounded by the
timeout, retried with backoff while the failure is retryable. Yields the attempts' chunks and a `tool_retry` before
each wait, then one `Outcome`; what happens on the way is told to the call's observer.

A retry is not made when it cannot help: the failure opened the circuit, the run's deadline comes before the backoff
ends, or chunks already reached the caller (a retry would repeat them). A half-open breaker's trial slot is released
by the attempt that holds it when that attempt is cancelled (the fleet's breaker: awaited on the way out; if that
await is cancelled too, the slot frees itself at its deadline).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.events import Event, ToolRetry
from service.events import ToolStatus as S
from service.policy.attempt import ChunkCounter, Outcome, attempt, attempt_stream
from service.policy.breaker import CircuitBreaker, Permit, State
from service.policy.fleet import FleetLimiter
from service.policy.fleet_breaker import Breaker
from service.policy.guards import Guards
from service.policy.limiter import RateLimiter
from service.policy.observer import CallObserver
from tools.base import CallInfo, Tool


async def guarded(
    tool: Tool[Any],
    args: Any,
    guards: Guards,
    *,
    run_id: str,
    call_id: str,
    counter: ChunkCounter,
    observer: CallObserver,
    remaining: Callable[[], float | None] | None,
    sleep: Callable[[float], Awaitable[None]],
) -> AsyncIterator[Event | Outcome]:
    name, policy, breaker = tool.name, guards.policy, guards.breaker
    if guards.limiter is not None:
        refused = await rate_limit(name, guards.limiter, observer)
        if refused is not None:
            yield refused
            return
    attempts = policy.retry.attempts
    outcome = Outcome(S.ERROR)
    for number in range(1, attempts + 1):
        permit = None
        if breaker is not None:
            # the process's own breaker answers at once, the fleet's is awaited: the embedded default gains a type
            # check per attempt, not an await
            permit = breaker.allow() if isinstance(breaker, CircuitBreaker) else await breaker.allow()
            if permit is None:
                yield refused_by(breaker, name, number, outcome)
                return
        observer.attempt_started(number)
        chunks_before = counter.n
        call = CallInfo(run_id=run_id, call_id=call_id, attempt=number)
        try:
            if tool.streaming:
                async for item in attempt_stream(
                    tool,
                    args,
                    call=call,
                    timeout_s=guards.timeout_s,
                    mode=policy.timeout.mode,
                    retry_timeouts=policy.retry.on_timeout,
                    counter=counter,
                ):
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        yield item
            else:
                outcome = await attempt(
                    tool, args, call=call, timeout_s=guards.timeout_s, retry_timeouts=policy.retry.on_timeout
                )
        except BaseException as exc:
            if breaker is not None and permit is not None:
                await release(breaker, permit)
            observer.attempt_aborted(exc)
            raise
        outcome.attempts = number
        if breaker is not None and permit is not None:
            if isinstance(breaker, CircuitBreaker):
                breaker.failure(permit) if unwell(outcome) else breaker.success(permit)
            else:
                await (breaker.failure(permit) if unwell(outcome) else breaker.success(permit))
        observer.attempt_ended(outcome, breaker)
        final = outcome.ok or not outcome.retryable or number == attempts
        if final or counter.n > chunks_before:  # chunks already reached the caller: a retry would repeat them
            yield outcome
            return
        wait = guards.backoff.wait(number)
        why = not_retried(name, breaker, wait, remaining)
        if why is not None:  # this failure is the call's answer
            outcome.error += f"; not retried: {why}"
            yield outcome
            return
        observer.retrying(name, number, attempts, wait, outcome.error)
        yield ToolRetry(call_id=call_id, attempt=number, max_attempts=attempts, wait_s=wait, error=outcome.error)
        await sleep(wait)
    yield outcome


async def rate_limit(tool: str, limiter: RateLimiter | FleetLimiter, observer: CallObserver) -> Outcome | None:
    """Take rate-limit capacity (waiting if the policy says so), or the rate_limited outcome."""
    waited = await limiter.acquire()
    observer.rate_limited(tool, waited)
    if waited is not None:
        return None
    limit = limiter.policy
    return Outcome(
        S.RATE_LIMITED,
        error=f"{tool} is rate limited ({limit.rate_per_s:g}/s, burst {limit.burst}); "
        "try again later or use another approach",
    )


async def release(breaker: Breaker, permit: Permit) -> None:
    """The attempt holding `permit` was cancelled: no verdict (a trial frees its slot)."""
    if isinstance(breaker, CircuitBreaker):
        breaker.release(permit)
    else:
        await breaker.release(permit)


def refused_by(breaker: Breaker, tool: str, number: int, last: Outcome) -> Outcome:
    """The answer of a call whose attempt `number` the breaker refused."""
    if number > 1:  # refused while this call waited to retry: the failure it had is its answer
        last.error += f"; not retried: {tool}'s circuit refused the call ({breaker.state.value})"
        return last
    return Outcome(
        S.CIRCUIT_OPEN,
        error=f"{tool} is unavailable (circuit open after repeated failures); try another approach",
        attempts=number - 1,
    )


def unwell(outcome: Outcome) -> bool:
    """Whether an attempt counts against the breaker. Timeouts, retryable errors and bugs say the tool is unwell;
    a non-retryable ToolError is the tool answering about this input (bad SQL, host not allowed): it is working."""
    if outcome.status is S.TIMEOUT:
        return True
    return outcome.status is S.ERROR and (outcome.retryable or outcome.error_type != "ToolError")


def not_retried(
    tool: str, breaker: Breaker | None, wait: float, remaining: Callable[[], float | None] | None
) -> str | None:
    """Why a retryable failure is not retried after all, or None: the failure opened the circuit (the retry would be
    refused), or the run's deadline comes before the backoff ends (the run would be stopped while waiting, and the
    call end CANCELLED instead of with its error)."""
    if breaker is not None and breaker.state is State.OPEN:
        return f"{tool}'s circuit opened"
    left = remaining() if remaining is not None else None
    if left is not None and wait >= left:
        return f"the run's deadline is {max(left, 0):.2f} s away, the backoff {wait:.2f} s"
    return None
