"""Retry backoff, for tool calls and model turns: tenacity's exponential backoff plus a random jitter (so concurrent
callers spread out), asked for one wait at a time.

The jitter stays on at the cap: tenacity's `wait_exponential_jitter` adds it and then caps the sum, so once the
exponential part reaches `max` every caller waits exactly `max` and they all come back together. Here the
exponential part is capped at `max - jitter` and the jitter added after, so waits stay within `max` and spread out.

The executor and the loop drive the attempts themselves (they must emit `tool_retry` before each wait, stop when the
breaker opens or the run is cancelled, and a model turn is a generator tenacity cannot re-run part-way), so they call
the wait strategy directly with a `RetryCallState` carrying the attempt number.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential, wait_random
from tenacity.wait import wait_base

from tools.policy import RetryPolicy


def jittered_backoff(initial_s: float, max_s: float, jitter_s: float) -> wait_base:
    """`initial_s * 2**(attempt-1)`, capped so that with up to `jitter_s` of random jitter added it stays within
    `max_s`. The jitter shrinks to what lies between the first wait and the cap, so that no wait is shorter than
    `initial_s` (or `max_s` when that is lower)."""
    jitter = max(0.0, min(jitter_s, max_s - initial_s))
    return wait_exponential(multiplier=initial_s, max=max_s - jitter) + wait_random(0, jitter)


def wait_after(strategy: wait_base, attempt: int) -> float:
    """Seconds `strategy` waits after failed attempt number `attempt` (1-based)."""
    state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
    state.attempt_number = attempt
    return float(strategy(state))


class Backoff:
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._wait = jittered_backoff(policy.initial_backoff_s, policy.max_backoff_s, policy.initial_backoff_s)

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        return wait_after(self._wait, attempt)
