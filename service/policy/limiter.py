"""Per-tool rate limiting: `rate_per_s` sustained with `burst` at once, either waiting up to `max_wait_s` for
capacity or rejecting at once.

A token bucket of our own, by reservation: a caller that finds no token takes the next one to come (the bucket goes
into debt) and sleeps until then, so waiters are served in the order they came, and a caller whose turn would come
after `max_wait_s` is refused at once, not after waiting `max_wait_s` for nothing (as with `aiolimiter`, used here
before: `wait_for(acquire(), max_wait_s)` cannot know in advance). A waiter cancelled before its turn gives its token
back when no one waits behind it (later waiters keep their turns: a token given back from the middle of the line
would be taken twice). Time comes from the injected `clock` and `sleep` (aiolimiter read the event loop's clock, so
the executor's injected clock never refilled it). This bucket is the process's; `fleet.py` has the fleet's, the
same bucket as one script in Redis behind the same `acquire()`, and this one as its stand-in while Redis is away.
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
        self._issued = 0  # the last turn counted in the debt, by number
        self._served = 0  # the last turn a waiter took
        self._waiting: dict[int, None] = {}  # the turns of the waiters still waiting, in order

    def take(self) -> bool:
        """Take a token if one is there now: the common case, which needs no coroutine (`acquire` starts here)."""
        now = self.clock()
        tokens = min(float(self.policy.burst), self._tokens + (now - self._at) * self.policy.rate_per_s)
        self._at = now
        if tokens >= 1:
            self._tokens = tokens - 1
            return True
        self._tokens = tokens
        return False

    async def acquire(self) -> float | None:
        """Take capacity for one call: the seconds waited for it, or None when the call must be rejected."""
        if self.take():
            return 0.0
        wait = (1 - self._tokens) / self.policy.rate_per_s  # until this caller's token has come, the earlier waiters'
        if self.policy.mode == "reject" or wait > self.policy.max_wait_s:
            return None
        self._tokens -= 1  # reserved: whoever comes next waits behind this caller
        self._issued += 1
        turn = self._issued
        self._waiting[turn] = None
        try:
            await self.sleep(wait)
        except BaseException:
            del self._waiting[turn]
            self._give_back(turn)
            raise
        del self._waiting[turn]
        self._served = turn
        return wait

    def _give_back(self, turn: int) -> None:
        """A waiter cancelled before its turn gives its token back, but only with no one waiting behind it: a later
        waiter's turn was counted after this one, and a newcomer given the token would take that turn too (two
        calls where the burst allows one). The turns of waiters that left before, behind it, come back with it."""
        last = next(reversed(self._waiting), self._served)
        if last < turn:
            self._tokens += self._issued - last
            self._issued = last
