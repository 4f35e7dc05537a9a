"""The rate limiter and the result cache shared by the fleet, through the policies' shared state (`shared.py`), each
with its process-local twin (`limiter.py`, `cache.py`) taking over while the shared state is unreachable.

The limiter keeps the local one's semantics for the fleet: the shared bucket (a token bucket by reservation, on the
store's clock) answers each call at once with go, the wait for its reserved token, or a refusal when the wait would
pass `max_wait_s` (or at all, in reject mode). Waiters are served in order: a process sends its callers' requests in
the order they came, those that came while a request was out together in the next one (`batcher.py`: one round trip
for many callers; two commands sent at once on a pool's connections could reach the store in either order), and never
wakes a later waiter before an earlier one. A waiter cancelled before its turn gives its token back if no one in the
fleet reserved after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

from service.policy.batcher import Batcher
from service.policy.cache import ResultCache
from service.policy.limiter import RateLimiter
from service.policy.shared import SharedPolicy, StateUnavailable, Take


class FleetLimiter:
    """`acquire()` as `RateLimiter`'s: the seconds waited, or None when the call must be rejected. `clock` None: the
    shared store's clock decides (the fleet's one clock); tests inject one."""

    def __init__(
        self,
        name: str,
        local: RateLimiter,
        shared: SharedPolicy,
        *,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.name = name
        self.local = local
        self.policy = local.policy
        self.shared = shared
        self.clock = clock
        self.sleep = sleep
        self._takes: Batcher[None, Take] = Batcher(name, "rate limit", self._take, orphaned=self._give_back)
        self._last_wake = float("-inf")

    async def acquire(self) -> float | None:
        shared = self.shared
        if shared.reach.degraded:
            return await self.local.acquire()
        try:
            take = await self._takes.ask(None)
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            return await self.local.acquire()
        if take.wait_s is None or take.wait_s == 0:
            return take.wait_s
        # Reserved on the store's clock, slept on this one: a later reservation's wait can come out a hair shorter
        # than an earlier one's (network jitter), so wake times here only ever go forward.
        now = time.monotonic()
        wake = max(now + take.wait_s, self._last_wake + 1e-6)
        self._last_wake = wake
        try:
            await self.sleep(wake - now)
        except BaseException:
            await self._give_back(take)
            raise
        return take.wait_s

    async def _take(self, batch: list[None]) -> list[Take]:
        now = self.clock() if self.clock else None
        return await self.shared.state.take(self.name, self.policy, now, len(batch))

    async def _give_back(self, take: Take) -> None:
        if not take.wait_s:
            return  # refused, or taken at once: nothing reserved (a token taken at once is spent)
        # unreachable: the token is lost for the fleet, one call's worth of capacity, refilled at the rate
        with contextlib.suppress(StateUnavailable):
            await self.shared.state.give_back(self.name, take.turn)


class FleetCache:
    """A result cache in the shared state: JSON values with the policy's TTL (`max_entries` bounds only the local
    twin: in the store, the TTL and its memory policy do). Unreachable: the local cache answers."""

    def __init__(self, name: str, local: ResultCache, shared: SharedPolicy) -> None:
        self.name = name
        self.local = local
        self.policy = local.policy
        self.shared = shared

    async def get(self, key: str) -> tuple[bool, Any]:
        """(hit, value), as `ResultCache.get`."""
        shared = self.shared
        if shared.reach.degraded:
            return self.local.get(key)
        try:
            raw = await shared.state.cache_get(self.name, key)
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            return self.local.get(key)
        if raw is None:
            return False, None
        return True, json.loads(raw)

    async def put(self, key: str, value: Any) -> None:
        shared = self.shared
        if shared.reach.degraded:
            self.local.put(key, value)
            return
        try:
            await shared.state.cache_put(self.name, key, json.dumps(value).encode(), self.policy.ttl_s)
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            self.local.put(key, value)
