"""Retry backoff for tool calls: tenacity's exponential backoff plus a random jitter of up to one multiplier (so
concurrent callers spread out), asked for one wait at a time.

The executor drives the attempts itself (it must emit `tool_retry` before each wait and stop when the breaker opens
or the run is cancelled), so it calls the wait strategy directly with a `RetryCallState` carrying the attempt
number, the way the loop does for model turns.
"""

from __future__ import annotations

from tenacity import RetryCallState, wait_exponential_jitter

from tools.policy import RetryPolicy


class Backoff:
    def __init__(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self._wait = wait_exponential_jitter(
            multiplier=policy.initial_backoff_s, max=policy.max_backoff_s, jitter=policy.initial_backoff_s
        )

    def wait(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempt
        return float(self._wait(state))
