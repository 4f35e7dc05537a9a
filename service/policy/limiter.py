"""Per-tool rate limiting: `rate_per_s` sustained with `burst` at once, either waiting up to `max_wait_s` for
capacity or rejecting at once.

Built on `aiolimiter`'s leaky bucket: it is awaitable and serves waiters in order, so "wait up to max_wait" is one
`asyncio.wait_for` around `acquire()` and "reject" is `has_capacity()` checked before acquiring (nothing awaits in
between, so no other task can take the capacity). `limits` was the alternative, but its `hit()` never waits, so
waiting would be a polling loop of our own; its storage URIs (`async+redis://`) are the way to a shared limiter
later, behind the same `acquire()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiolimiter import AsyncLimiter

from tools.policy import RateLimitPolicy


class RateLimiter:
    def __init__(self, policy: RateLimitPolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._bucket = AsyncLimiter(policy.burst, policy.burst / policy.rate_per_s)

    async def acquire(self) -> float | None:
        """Take capacity for one call: the seconds waited for it, or None when the call must be rejected."""
        if self._bucket.has_capacity():
            await self._bucket.acquire()  # returns at once: capacity was just seen, and nothing awaited since
            return 0.0
        if self.policy.mode == "reject" or self.policy.max_wait_s <= 0:
            return None
        started = self.clock()
        try:
            await asyncio.wait_for(self._bucket.acquire(), self.policy.max_wait_s)
        except TimeoutError:
            return None
        return self.clock() - started
