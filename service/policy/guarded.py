"""A tool's guarded run: rate limit once, then attempts, each let through by the circuit breaker and bounded by the
timeout, retried with backoff while the failure is retryable. Yields the attempts' chunks and a `tool_retry` before
each wait, then one `Outcome`; what happens on the way is told to the call's observer.

A retry is not made when it cannot help: the failure opened the circuit, the run's deadline comes before the backoff
ends, or chunks already reached the caller (a retry would repeat them). A half-open breaker's trial slot is released
by the attempt that holds it when that attempt is cancelled (the fleet's breaker: awaited on the way out; if that
await is cancelled too, the slot frees itself at its deadline).

A tool that answers in one piece starts with `first_attempt`, a coroutine, and the pipeline goes on in `guarded`
only when that attempt must be retried: the common call passes through no generator here.
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
    first: Outcome | None = None,
) -> AsyncIterator[Event | Outcome]:
    """`first`: the outcome of the rate limit and attempt 1 when `first_attempt` ran them; the stage goes on from
    there (the common call never gets here: see `first_attempt`)."""
    name, policy, breaker = tool.name, guards.policy, guards.breaker
    attempts = policy.retry.attempts
    outcome = first
    if outcome is None and guards.limiter is not None:
        outcome = await rate_limit(name, guards.limiter, observer)
    number = 0 if first is None else 1
    while outcome is None or not settled(outcome, number, attempts):
        if outcome is not None:  # a retryable failure of attempt `number`
            wait = guards.backoff.wait(number)
            why = not_retried(name, breaker, wait, remaining)
            if why is not None:  # this failure is the call's answer
                outcome.error += f"; not retried: {why}"
                break
            observer.retrying(name, number, attempts, wait, outcome.error)
            yield ToolRetry(call_id=call_id, attempt=number, max_attempts=attempts, wait_s=wait, error=outcome.error)
            await sleep(wait)
        number += 1
        if not tool.streaming:
            outcome = await attempt_once(
                tool, args, guards, number, outcome, run_id=run_id, call_id=call_id, observer=observer
            )
            continue
        permit = None
        if breaker is not None:
            permit = breaker.allow() if isinstance(breaker, CircuitBreaker) else await breaker.allow()
            if permit is None:
                outcome = refused_by(breaker, name, number, outcome or Outcome(S.ERROR))
                break
        observer.attempt_started(number)
        chunks_before = counter.n
        try:
            async for item in attempt_stream(
                tool,
                args,
                call=CallInfo(run_id=run_id, call_id=call_id, attempt=number),
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
                await release(breaker, permit)
            observer.attempt_aborted(exc)
            raise
        assert outcome is not None  # attempt_stream ends with its Outcome
        await judged(breaker, permit, outcome, number, observer)
        if counter.n > chunks_before:  # chunks already reached the caller: a retry would repeat them
            break
    yield outcome


async def first_attempt(
    tool: Tool[Any], args: Any, guards: Guards, *, run_id: str, call_id: str, observer: CallObserver
) -> Outcome:
    """The rate limit and attempt 1 of a tool that answers in one piece, as a coroutine: when its outcome is
    `settled` (it worked, or failed for good) that is the stage's answer, and the call is spared the generators of
    `guarded` and the pipeline (two async generators, about a twentieth of the executor's instructions per call);
    otherwise `guarded(first=...)` goes on with the retries."""
    if guards.limiter is not None:
        refused = await rate_limit(tool.name, guards.limiter, observer)
        if refused is not None:
            return refused
    return await attempt_once(tool, args, guards, 1, None, run_id=run_id, call_id=call_id, observer=observer)


async def attempt_once(
    tool: Tool[Any],
    args: Any,
    guards: Guards,
    number: int,
    last: Outcome | None,
    *,
    run_id: str,
    call_id: str,
    observer: CallObserver,
) -> Outcome:
    """Attempt `number` of a tool that answers in one piece, let through and judged by the breaker; `last` is the
    previous attempt's outcome, the answer if the breaker refuses this one."""
    policy, breaker = guards.policy, guards.breaker
    permit = None
    if breaker is not None:
        # the process's own breaker answers at once, the fleet's is awaited: the embedded default gains a type
        # check per attempt, not an await
        permit = breaker.allow() if isinstance(breaker, CircuitBreaker) else await breaker.allow()
        if permit is None:
            return refused_by(breaker, tool.name, number, last or Outcome(S.ERROR))
    observer.attempt_started(number)
    call = CallInfo(run_id=run_id, call_id=call_id, attempt=number)
    try:
        outcome = await attempt(
            tool, args, call=call, timeout_s=guards.timeout_s, retry_timeouts=policy.retry.on_timeout
        )
    except BaseException as exc:
        if breaker is not None and permit is not None:
            await release(breaker, permit)
        observer.attempt_aborted(exc)
        raise
    await judged(breaker, permit, outcome, number, observer)
    return outcome


async def judged(
    breaker: Breaker | None, permit: Permit | None, outcome: Outcome, number: int, observer: CallObserver
) -> None:
    """Attempt `number` ended as `outcome`: the breaker counts it, the observer records it."""
    outcome.attempts = number
    if breaker is not None and permit is not None:
        if isinstance(breaker, CircuitBreaker):
            breaker.failure(permit) if unwell(outcome) else breaker.success(permit)
        else:
            await (breaker.failure(permit) if unwell(outcome) else breaker.success(permit))
    observer.attempt_ended(outcome, breaker)


def settled(outcome: Outcome, number: int, attempts: int) -> bool:
    """Whether attempt `number`'s outcome is the stage's answer: it worked, failed for good (a refusal is not
    retryable either), or was the last attempt."""
    return outcome.ok or not outcome.retryable or number >= attempts


async def rate_limit(tool: str, limiter: RateLimiter | FleetLimiter, observer: CallObserver) -> Outcome | None:
    """Take rate-limit capacity (waiting if the policy says so), or the rate_limited outcome."""
    # a token at hand is taken without awaiting `acquire` (the process's own limiter; the fleet's is always awaited)
    waited = 0.0 if isinstance(limiter, RateLimiter) and limiter.take() else await limiter.acquire()
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
    if number > 1:  # refused while this call waited to retry: the failure it had is its answer (`settled`)
        last.error += f"; not retried: {tool}'s circuit refused the call ({breaker.state.value})"
        last.retryable = False
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
