"""A tool's policy and the stateful parts that enforce it (breaker, limiter, cache, backoff), built once per
executor."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service import telemetry
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
        telemetry.observe(telemetry.CIRCUIT_STATE.labels(name), lambda: breaker.state.gauge)
        guards.breaker = breaker
    if policy.rate_limit is not None:
        guards.limiter = RateLimiter(policy.rate_limit, clock=clock, sleep=sleep)
    if policy.cache is not None:
        guards.cache = ResultCache(policy.cache, clock=clock)
    return guards


def breaker_moved(tool: str, before: State, after: State) -> None:
    telemetry.CIRCUIT_TRANSITIONS.labels(tool, before.value, after.value).inc()
    log.warning("circuit breaker state changed", extra={"tool": tool, "from": before.value, "to": after.value})
