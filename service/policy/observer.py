"""What the policy stages tell about a call as it runs. The stages decide; the observer records (metrics, spans,
logs), so neither knows the other's business. `service/recording.py` implements it, one object per call."""

from __future__ import annotations

from typing import Protocol

from service.policy.attempt import Outcome
from service.policy.fleet_breaker import Breaker


class CallObserver(Protocol):
    def cache_hit(self, tool: str) -> None:
        """The call was answered from the result cache."""

    def rate_limited(self, tool: str, waited: float | None) -> None:
        """The rate limiter let the call through after `waited` seconds, or refused it (None)."""

    def attempt_started(self, number: int) -> None:
        """Attempt `number` (1-based) begins: the breaker let it through."""

    def attempt_ended(self, outcome: Outcome, breaker: Breaker | None) -> None:
        """The attempt ended as `outcome`; `breaker` has counted it."""

    def attempt_aborted(self, exc: BaseException) -> None:
        """The attempt was cancelled or closed while running: `exc` propagates."""

    def retrying(self, tool: str, number: int, attempts: int, wait: float, error: str) -> None:
        """Attempt `number` of `attempts` failed with `error`; the next begins after `wait` seconds."""

    def fallback_started(self, primary: str, fallback: str, reason: str) -> None:
        """`primary` failed for `reason`; `fallback` is tried with the same input. Attempts now are the fallback's."""

    def fallback_ended(self, outcome: Outcome | BaseException) -> None:
        """The fallback's own outcome, or the exception that ended it."""
