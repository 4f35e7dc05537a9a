"""A circuit breaker whose state the fleet shares (`scope: fleet` with a shared state.url): the same states, permits
and epochs as `breaker.py`'s, but every change is one atomic script in the shared store, on its clock. Opened by
failures on one replica, it refuses calls on all; half-open, it admits exactly one trial call in the fleet.

The trial holds its slot until a deadline (the call's timeout and a margin), not forever: a replica that dies with the
slot would otherwise keep the circuit half-open and refusing. A later trial admitted after the deadline starts a new
epoch, so the first one's verdict, if it ever comes, no longer counts.

While the shared store is unreachable, calls go through this process's own breaker (the `local` twin): admitted by
it, their verdicts count there. A shared permit whose verdict cannot be delivered is dropped (one call's worth).
`state` is what this process last learned (or the local twin's, degraded): what metrics, spans and logs show.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

from service.policy.breaker import CircuitBreaker, Permit, State, Transition
from service.policy.shared import BreakerAnswer, SharedPolicy, StateUnavailable


class FleetBreaker:
    """`allow()` before a call; then, with its permit, exactly one of `success()`, `failure()` or `release()`, as
    with `CircuitBreaker`, but awaited. `clock` None: the shared store's clock decides; tests inject one."""

    def __init__(
        self,
        local: CircuitBreaker,
        shared: SharedPolicy,
        *,
        trial_ttl_s: float,
        clock: Callable[[], float] | None = None,
        on_transition: Transition | None = None,
    ) -> None:
        self.name = local.name
        self.policy = local.policy
        self.local = local
        self.shared = shared
        self.trial_ttl_s = trial_ttl_s
        self.clock = clock
        self.on_transition = on_transition
        self._known = State.CLOSED
        self._half_open_at = 0.0  # on `clock` (or time.monotonic): when a circuit known to be open turns half-open

    @property
    def state(self) -> State:
        if self.shared.reach.degraded:
            return self.local.state
        if self._known is State.OPEN and (self.clock or time.monotonic)() >= self._half_open_at:
            return State.HALF_OPEN
        return self._known

    async def allow(self) -> Permit | None:
        """A permit for one call, or None when the circuit refuses it."""
        shared = self.shared
        if shared.reach.degraded:
            return self.local.allow()
        try:
            answer = await shared.state.breaker_allow(self.name, self.policy, self.trial_ttl_s, self._now())
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            return self.local.allow()
        self._learn(answer)
        if not answer.admitted:
            return None
        return Permit(answer.epoch, trial=answer.trial, shared=True)

    async def success(self, permit: Permit) -> None:
        if not permit.shared:
            self.local.success(permit)
            return
        await self._verdict(permit, failed=False)

    async def failure(self, permit: Permit) -> None:
        if not permit.shared:
            self.local.failure(permit)
            return
        await self._verdict(permit, failed=True)

    async def release(self, permit: Permit) -> None:
        """The call ended without a verdict (cancelled): a trial frees the slot for the next caller in the fleet."""
        if not permit.shared:
            self.local.release(permit)
            return
        if not permit.trial:
            return
        with contextlib.suppress(StateUnavailable):  # unreachable: the slot frees itself at its deadline
            await self.shared.state.breaker_release(self.name, permit.epoch)

    async def _verdict(self, permit: Permit, *, failed: bool) -> None:
        shared = self.shared
        try:
            answer = await shared.state.breaker_verdict(self.name, self.policy, permit.epoch, failed, self._now())
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            return
        self._learn(answer)

    def _now(self) -> float | None:
        return self.clock() if self.clock is not None else None

    def _learn(self, answer: BreakerAnswer) -> None:
        self._known = answer.state
        if answer.state is State.OPEN:
            self._half_open_at = (self.clock or time.monotonic)() + answer.cooldown_left_s
        if answer.before is not answer.state and self.on_transition is not None:
            self.on_transition(self.name, answer.before, answer.state)


Breaker = CircuitBreaker | FleetBreaker
