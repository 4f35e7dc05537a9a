"""A tool's policy and the stateful parts that enforce it (breaker, limiter, cache, backoff), built once per
executor: the process's own, or with a shared state (`shared.py`) the fleet's, each with the process's own as its
stand-in (`fleet.py`, `fleet_breaker.py`)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from service import tally, telemetry
from service.policy.breaker import CircuitBreaker, State
from service.policy.cache import ResultCache
from service.policy.fleet import FleetCache, FleetLimiter
from service.policy.fleet_breaker import Breaker, FleetBreaker
from service.policy.limiter import RateLimiter
from service.policy.retry import Backoff
from service.policy.shared import SharedPolicy
from tools.policy import ToolPolicy

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Guards:
    policy: ToolPolicy
    timeout_s: float
    backoff: Backoff
    breaker: Breaker | None = None
    limiter: RateLimiter | FleetLimiter | None = None
    cache: ResultCache | FleetCache | None = None


def build_guards(
    name: str,
    policy: ToolPolicy,
    *,
    default_timeout_s: float,
    shared: SharedPolicy | None = None,
    shared_clock: Callable[[], float] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> Guards:
    """`shared`: the fleet's state, on its own clock unless `shared_clock` is given (tests)."""
    timeout_s = policy.timeout.seconds or default_timeout_s
    guards = Guards(policy, timeout_s, Backoff(policy.retry))
    if policy.breaker is not None:
        local = CircuitBreaker(name, policy.breaker, clock=clock, on_transition=breaker_moved)
        breaker: Breaker = local
        if shared is not None and policy.breaker.scope == "fleet":
            # the trial slot outlives the trial's one attempt (its timeout) by a margin for the round trips; past
            # it the holder is taken for dead and the next caller in the fleet may try
            breaker = FleetBreaker(
                local, shared, trial_ttl_s=timeout_s + 5.0, clock=shared_clock, on_transition=breaker_moved
            )
        # read at each scrape rather than set at each transition: an open circuit turns half-open when its cooldown
        # ends, with no call (and so no transition) to say so, and a shared store changes under other replicas' calls
        tally.observe(telemetry.CIRCUIT_STATE.labels(name), lambda: breaker.state.gauge)
        guards.breaker = breaker
    if policy.rate_limit is not None:
        limiter = RateLimiter(policy.rate_limit, clock=clock, sleep=sleep)
        guards.limiter = limiter
        if shared is not None:
            guards.limiter = FleetLimiter(name, limiter, shared, clock=shared_clock, sleep=sleep)
    if policy.cache is not None:
        cache = ResultCache(policy.cache, clock=clock)
        guards.cache = cache
        if shared is not None and shared.cache:
            guards.cache = FleetCache(name, cache, shared)
    return guards


def breaker_moved(tool: str, before: State, after: State) -> None:
    telemetry.CIRCUIT_TRANSITIONS.labels(tool, before.value, after.value).inc()
    log.warning("circuit breaker state changed", extra={"tool": tool, "from": before.value, "to": after.value})
