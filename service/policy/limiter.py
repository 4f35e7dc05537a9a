"""Per-tool rate limiting: `rate_per_s` sustained with `burst` at once, either waiting up to `max_wait_s` for
capacity or rejecting at once.

A token bucket of our own, by reservation: a caller that finds no token takes the next one to come (the bucket goes
into debt) and sleeps until then, so waiters are served in the order they came, and a caller whose turn would come
after `max_wait_s` is refused at once, not after waiting `max_wait_s` for nothing (as with `aiolimiter`, used here
before: `wait_for(acquire(), max_wait_s)` cannot know in advance). A waiter cancelled before its turn gives its token
back. Time comes from the injected `clock` and `sleep` (aiolimiter read the event loop's clock, so the executor's
injected clock never refilled it). `limits` (`async+redis://`) is the way to a shared limiter later, behind the same
`acquire()`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from tools.policy import RateLimitPolicy


class RateLimiter:
    def __init__(
        self,
        policy: RateLimitPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.policy = policy
        self.clock = clock
        self.sleep = sleep
        self._tokens = float(policy.burst)  # at `_at`; below 0 while callers wait for reserved tokens
        self._at = clock()

    async def acquire(self) -> float | None:
        """Take capacity for one call: the seconds waited for it, or None when the call must be rejected."""
        now = self.clock()
        rate = self.policy.rate_per_s
        tokens = min(float(self.policy.burst), self._tokens + (now - self._at) * rate)
        self._at = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return 0.0
        wait = (1 - tokens) / rate  # until this caller's token has come, the earlier waiters' before it
        self._tokens = tokens
        if self.policy.mode == "reject" or wait > self.policy.max_wait_s:
            return None
        self._tokens -= 1  # reserved: whoever comes next waits behind this caller
        try:
            await self.sleep(wait)
        except BaseException:
            self._tokens += 1  # cancelled before its turn: the token goes back (later waiters keep their turns)
            raise
        return wait
