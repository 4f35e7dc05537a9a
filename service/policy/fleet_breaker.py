"""A circuit breaker whose state the fleet shares (`scope: fleet` with a shared state.url): the same states, permits
and epochs as `breaker.py`'s, but every change is one atomic script in the shared store, on its clock. Opened by
failures on one replica, it refuses calls on all; half-open, it admits exactly one trial call in the fleet.

The trial holds its slot until a deadline (the call's timeout and a margin), not forever: a replica that dies with the
slot would otherwise keep the circuit half-open and refusing. A later trial admitted after the deadline starts a new
epoch, so the first one's verdict, if it ever comes, no longer counts.

Requests are batched as `fleet.py`'s limiter batches its takes (`batcher.py`): one request out at a time per breaker,
and those that came while it was out go together in the next one, in the order they came (one script run answers
them in turn), so a breaker's verdicts keep their order and many calls share a round trip. A call waits for its allow,
its failure (the retry decision reads the state it leads to) and a trial's verdict or release; a non-trial success
(it cannot change the state: see `success`) is sent without the call waiting (but see the fast path below), and
`SharedPolicy.aclose` lets it arrive.

With nothing else out and sparse traffic, an allow on a circuit this process last saw closed, and a non-trial success,
go from the caller's own task (`batcher.py`'s fast path: no task, no hop through the loop; the success's call then waits
for its round trip, as every verdict did before batching). Should the caller be cancelled during that round trip, the
request may have been made or not: a success lost is one call missing from the window; an allow costs nothing unless
another replica opened the circuit since and its cool-down ended, and then the trial slot it took frees itself at its
deadline, as a dead replica's does.

While the shared store is unreachable, calls go through this process's own breaker (the `local` twin): admitted by
it, their verdicts count there. A shared permit whose verdict cannot be delivered is dropped (one call's worth).
`state` is what this process last learned (or the local twin's, degraded): what metrics, spans and logs show.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

from service.policy.batcher import Batcher
from service.policy.breaker import CircuitBreaker, Permit, State, Transition
from service.policy.shared import BreakerAnswer, BreakerRequest, SharedPolicy, StateUnavailable

log = logging.getLogger(__name__)


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
        self._requests: Batcher[BreakerRequest, BreakerAnswer] = Batcher(
            self.name,
            "circuit breaker",
            self._send,
            orphaned=self._orphaned,
            # a batch that failed (timed out, most likely): the allows queued meanwhile go on locally at once, as they
            # would once degraded, rather than wait out a second timeout; verdicts and releases are still tried
            fails_with=lambda request: request.kind == "allow",
            dropped=self._dropped,
            senders=shared.senders,
        )

    @property
    def state(self) -> State:
        if self.shared.reach.degraded:
            return self.local.state
        if self._known is State.OPEN and (self.clock or time.monotonic)() >= self._half_open_at:
            return State.HALF_OPEN
        return self._known

    async def allow(self) -> Permit | None:
        """A permit for one call, or None when the circuit refuses it.

        Always asked of the store, even when this process last saw the circuit closed: another replica may have
        opened it since, and then this call must be refused. (A batch is the one reuse: its allows are answered
        together, in the one state the store has at that moment.)"""
        shared = self.shared
        if shared.reach.degraded:
            return self.local.allow()
        try:
            # known closed, an allow is admitted outside a trial and reserves nothing: it may go from this task
            answer = await self._requests.ask(BreakerRequest("allow"), here=self._known is State.CLOSED)
        except StateUnavailable as exc:
            shared.reach.failed(exc)
            return self.local.allow()
        if not answer.admitted:
            return None
        return Permit(answer.epoch, trial=answer.trial, shared=True)

    async def success(self, permit: Permit) -> None:
        if not permit.shared:
            self.local.success(permit)
            return
        if not permit.trial:
            # Admitted outside a trial, its success changes no state (closed it stays closed; any other epoch's
            # verdict counts for nothing), so the call need not wait for its answer, nor for a batch out before it.
            # It still goes out: it counts in the window and ends the fleet's run of consecutive failures (another
            # replica's failures count there), so it is never skipped, even by a circuit this process saw closed.
            await self._requests.tell(BreakerRequest("success", permit.epoch))
            return
        await self._verdict(BreakerRequest("success", permit.epoch))

    async def failure(self, permit: Permit) -> None:
        if not permit.shared:
            self.local.failure(permit)
            return
        await self._verdict(BreakerRequest("failure", permit.epoch))

    async def release(self, permit: Permit) -> None:
        """The call ended without a verdict (cancelled): a trial frees the slot for the next caller in the fleet."""
        if not permit.shared:
            self.local.release(permit)
            return
        if not permit.trial:
            return
        with contextlib.suppress(StateUnavailable):  # unreachable: the slot frees itself at its deadline
            await self._requests.ask(BreakerRequest("release", permit.epoch))

    async def settle(self) -> None:
        """Until every request made so far has its answer (tests; a verdict's call does not wait for it)."""
        await self._requests.settle()

    async def _verdict(self, request: BreakerRequest) -> None:
        try:
            await self._requests.ask(request)
        except StateUnavailable as exc:
            self.shared.reach.failed(exc)

    async def _send(self, requests: list[BreakerRequest]) -> list[BreakerAnswer]:
        answers = await self.shared.state.breaker(self.name, self.policy, self.trial_ttl_s, self._now(), requests)
        for answer in answers:  # in the order the store made them
            self._learn(answer)
        return answers

    async def _orphaned(self, answer: BreakerAnswer) -> None:
        if answer.trial:  # admitted to a caller cancelled while its allow was out: free the slot
            self._requests.post(BreakerRequest("release", answer.epoch))

    def _dropped(self, request: BreakerRequest, exc: StateUnavailable) -> None:
        if request.kind != "release":  # a verdict nobody waits for is dropped, as an awaited one would be
            self.shared.reach.failed(exc)

    def _now(self) -> float | None:
        return self.clock() if self.clock is not None else None

    def _learn(self, answer: BreakerAnswer) -> None:
        self._known = answer.state
        if answer.state is State.OPEN:
            self._half_open_at = (self.clock or time.monotonic)() + answer.cooldown_left_s
        if answer.before is not answer.state and self.on_transition is not None:
            self.on_transition(self.name, answer.before, answer.state)


Breaker = CircuitBreaker | FleetBreaker
