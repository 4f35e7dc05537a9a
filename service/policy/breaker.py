"""A circuit breaker per tool: closed → open after N consecutive failures or a failure rate over a window; open for a
cool-down; then half-open, where one trial call decides between closed and open again.

Our own rather than a library's: Python's breakers are sync-only (pybreaker), unmaintained (aiobreaker), in-memory
only (circuitbreaker) or pin old Redis clients with non-atomic updates (purgatory). This one is the process's own
(`scope: process`, the embedded default, and the fleet breaker's stand-in while the shared state is unreachable);
`fleet_breaker.py` is the fleet's, changed only by atomic scripts in the shared store (a load/save store behind this
class could not be: two replicas would each load closed, and each let a trial through). Time comes from an
injectable clock so tests need no sleeping. Only failures that are the tool's fault are recorded: the executor never
reports validation or dependency refusals here.

Every admitted call gets a `Permit`: the epoch it was admitted in (counted up on every change of state) and whether
it holds the half-open trial slot. Only the slot's holder frees it, and a verdict counts only in the epoch its call
was admitted in. A call admitted while closed that ends after the circuit opened tells how the tool was before the
cool-down, not whether it has recovered: its failure does not reopen a half-open circuit, its success does not
close it (the trial decides; closing early would let every caller in beside the trial), and neither counts in a
later closed period. While the circuit is open such verdicts never mattered: counts and the window restart on
closing.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from tools.policy import BreakerPolicy


class State(enum.Enum):
    CLOSED = "closed"
    HALF_OPEN = "half_open"
    OPEN = "open"

    @property
    def gauge(self) -> int:
        """The value of the `agent_tool_circuit_state` gauge: 0 closed, 1 half-open, 2 open."""
        return _GAUGE[self]


_GAUGE = {State.CLOSED: 0, State.HALF_OPEN: 1, State.OPEN: 2}


@dataclass
class BreakerState:
    state: State = State.CLOSED
    consecutive_failures: int = 0
    opened_at: float = 0.0
    trial_in_flight: bool = False
    epoch: int = 0  # counts changes of state: tells a permit of this state from one of an earlier state
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed) within the window
    failures: int = 0  # how many of `outcomes` failed: kept as they come and go, never summed per call


Transition = Callable[[str, State, State], None]


@dataclass(frozen=True, slots=True)
class Permit:
    """An admitted call's ticket, handed back with its verdict: the epoch it was admitted in, whether it holds the
    half-open trial slot, and whether the fleet's breaker gave it (`fleet_breaker.py`) or this process's."""

    epoch: int
    trial: bool = False
    shared: bool = False


class CircuitBreaker:
    """`allow()` before a call; then, with the permit it gave, exactly one of `success()`, `failure()` or `release()`
    (cancelled: no verdict)."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.current = BreakerState()  # this process's, held here: nothing else reads or writes it
        self.clock = clock
        self.on_transition = on_transition
        self._closed = Permit(0)  # a permit is immutable: every call of a closed epoch gets the same one

    @property
    def state(self) -> State:
        s = self.current
        if s.state is State.OPEN and self.clock() - s.opened_at >= self.policy.cooldown_s:
            return State.HALF_OPEN
        return s.state

    def allow(self) -> Permit | None:
        """A permit for one call, or None when the circuit refuses it."""
        s = self.current
        if s.state is State.CLOSED:
            if self._closed.epoch != s.epoch:
                self._closed = Permit(s.epoch)
            return self._closed
        if s.state is State.OPEN:
            if self.clock() - s.opened_at < self.policy.cooldown_s:
                return None
            self._move(s, State.HALF_OPEN)
        if s.trial_in_flight:  # half-open: one trial call at a time
            return None
        s.trial_in_flight = True
        return Permit(s.epoch, trial=True)

    def success(self, permit: Permit) -> None:
        s = self.current
        if permit.epoch != s.epoch:  # admitted in an earlier state: see the module docstring
            return
        s.consecutive_failures = 0
        self._remember(s, failed=False)
        if s.state is State.HALF_OPEN:  # a permit of this epoch, half-open, is the trial's
            s.outcomes.clear()
            s.failures = 0
            self._move(s, State.CLOSED)

    def failure(self, permit: Permit) -> None:
        s = self.current
        if permit.epoch != s.epoch:
            return
        s.consecutive_failures += 1
        self._remember(s, failed=True)
        if s.state is State.HALF_OPEN or (s.state is State.CLOSED and self._tripped(s)):
            s.opened_at = self.clock()
            self._move(s, State.OPEN)

    def release(self, permit: Permit) -> None:
        """The call ended without a verdict (cancelled): if it held the half-open trial slot, the next caller may
        try. Any other call leaves the slot alone: it may be another call's."""
        s = self.current
        if permit.trial and permit.epoch == s.epoch:
            s.trial_in_flight = False

    def _remember(self, s: BreakerState, *, failed: bool) -> None:
        now = self.clock()
        s.outcomes.append((now, failed))
        s.failures += failed
        horizon = now - self.policy.window_s
        while s.outcomes and s.outcomes[0][0] < horizon:
            s.failures -= s.outcomes.popleft()[1]

    def _tripped(self, s: BreakerState) -> bool:
        if s.consecutive_failures >= self.policy.failure_threshold:
            return True
        calls = len(s.outcomes)
        if calls < self.policy.min_calls:
            return False
        return s.failures / calls >= self.policy.failure_rate

    def _move(self, s: BreakerState, to: State) -> None:
        before, s.state = s.state, to
        if before is not to:
            s.epoch += 1
            s.trial_in_flight = False  # the slot belongs to one half-open period; a new one starts free
        if to is State.CLOSED:
            s.consecutive_failures = 0
        if self.on_transition is not None and before is not to:
            self.on_transition(self.name, before, to)
