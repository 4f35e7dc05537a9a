"""A tool's policy and the stateful parts that enforce it (breaker, limiter, cache, backoff), built once per
executor, plus the small decisions the executor asks of them."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service import telemetry
from service.events import ToolStatus as S
from service.policy.attempt import Outcome
from service.policy.breaker import BreakerStore, CircuitBreaker, State
from service.policy.cache import ResultCache
from service.policy.limiter import RateLimiter
from service.policy.retry import Backoff
from tools.policy import ToolPolicy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Guards:
    policy: ToolPolicy
    timeout_s: float
    backoff: Backoff
    breaker: CircuitBreaker | None = None
    limiter: RateLimiter | None = None
    cache: ResultCache | None = None


def build_guards(
    name: str,
    policy: ToolPolicy,
    *,
    default_timeout_s: float,
    store: BreakerStore | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Guards:
    guards = Guards(policy, policy.timeout.seconds or default_timeout_s, Backoff(policy.retry))
    if policy.breaker is not None:
        breaker = CircuitBreaker(name, policy.breaker, store=store, clock=clock, on_transition=breaker_moved)
        # read at each scrape rather than set at each transition: an open circuit turns half-open when its cooldown
        # ends, with no call (and so no transition) to say so, and a shared store changes under other replicas' calls
        telemetry.CIRCUIT_STATE.labels(name).set_function(lambda: breaker.state.gauge)
        guards.breaker = breaker
    if policy.rate_limit is not None:
        guards.limiter = RateLimiter(policy.rate_limit, clock=clock, sleep=sleep)
    if policy.cache is not None:
        guards.cache = ResultCache(policy.cache, clock=clock)
    return guards


async def rate_limit(tool: str, limiter: RateLimiter) -> Outcome | None:
    """Take rate-limit capacity (waiting if the policy says so), or the rate_limited outcome."""
    waited = await limiter.acquire()
    if waited is None:
        telemetry.RATE_LIMITED.labels(tool).inc()
        limit = limiter.policy
        return Outcome(
            S.RATE_LIMITED,
            error=f"{tool} is rate limited ({limit.rate_per_s:g}/s, burst {limit.burst}); "
            "try again later or use another approach",
        )
    telemetry.child(telemetry.RATE_LIMIT_WAIT, tool).observe(waited)
    return None


def unwell(outcome: Outcome) -> bool:
    """Whether an attempt counts against the breaker. Timeouts, retryable errors and bugs say the tool is unwell;
    a non-retryable ToolError is the tool answering about this input (bad SQL, host not allowed): it is working."""
    if outcome.status is S.TIMEOUT:
        return True
    return outcome.status is S.ERROR and (outcome.retryable or outcome.error_type != "ToolError")


def breaker_moved(tool: str, before: State, after: State) -> None:
    telemetry.CIRCUIT_TRANSITIONS.labels(tool, before.value, after.value).inc()
    log.warning("circuit breaker state changed", extra={"tool": tool, "from": before.value, "to": after.value})
