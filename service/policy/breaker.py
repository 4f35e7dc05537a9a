"""A circuit breaker per tool: closed → open after N consecutive failures or a failure rate over a window; open for a
cool-down; then half-open, where one trial call decides between closed and open again.

Our own rather than a library's: Python's breakers are sync-only (pybreaker), unmaintained (aiobreaker), in-memory
only (circuitbreaker) or pin old Redis clients with non-atomic updates (purgatory). State lives behind the small
`BreakerStore` protocol (in memory by default) so a shared store can come later, and time comes from an injectable
clock so tests need no sleeping. Only failures that are the tool's fault are recorded: the executor never reports
validation or dependency refusals here.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

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
    outcomes: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed) within the window


class BreakerStore(Protocol):
    """Where breaker state lives. The in-memory store serves one process; a Redis store would serve replicas."""

    def load(self, name: str) -> BreakerState: ...

    def save(self, name: str, state: BreakerState) -> None: ...


class MemoryBreakerStore:
    def __init__(self) -> None:
        self._states: dict[str, BreakerState] = {}

    def load(self, name: str) -> BreakerState:
        return self._states.setdefault(name, BreakerState())

    def save(self, name: str, state: BreakerState) -> None:
        self._states[name] = state


Transition = Callable[[str, State, State], None]


class CircuitBreaker:
    """`allow()` before a call; then exactly one of `success()`, `failure()` or `release()` (cancelled: no verdict)."""

    def __init__(
        self,
        name: str,
        policy: BreakerPolicy,
        *,
        store: BreakerStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_transition: Transition | None = None,
    ) -> None:
        self.name = name
        self.policy = policy
        self.store = store or MemoryBreakerStore()
        self.clock = clock
        self.on_transition = on_transition

    @property
    def state(self) -> State:
        s = self.store.load(self.name)
        if s.state is State.OPEN and self.clock() - s.opened_at >= self.policy.cooldown_s:
            return State.HALF_OPEN
        return s.state

    def allow(self) -> bool:
        s = self.store.load(self.name)
        if s.state is State.CLOSED:
            return True
        if s.state is State.OPEN:
            if self.clock() - s.opened_at < self.policy.cooldown_s:
                return False
            self._move(s, State.HALF_OPEN)
        if s.trial_in_flight:  # half-open: one trial call at a time
            return False
        s.trial_in_flight = True
        self.store.save(self.name, s)
        return True

    def success(self) -> None:
        s = self.store.load(self.name)
        s.consecutive_failures = 0
        s.trial_in_flight = False
        self._remember(s, failed=False)
        if s.state is State.HALF_OPEN:
            s.outcomes.clear()
            self._move(s, State.CLOSED)
        self.store.save(self.name, s)

    def failure(self) -> None:
        s = self.store.load(self.name)
        s.consecutive_failures += 1
        s.trial_in_flight = False
        self._remember(s, failed=True)
        if s.state is State.HALF_OPEN or (s.state is State.CLOSED and self._tripped(s)):
            s.opened_at = self.clock()
            self._move(s, State.OPEN)
        self.store.save(self.name, s)

    def release(self) -> None:
        """The call ended without a verdict (cancelled): free the half-open trial slot."""
        s = self.store.load(self.name)
        s.trial_in_flight = False
        self.store.save(self.name, s)

    def _remember(self, s: BreakerState, *, failed: bool) -> None:
        now = self.clock()
        s.outcomes.append((now, failed))
        horizon = now - self.policy.window_s
        while s.outcomes and s.outcomes[0][0] < horizon:
            s.outcomes.popleft()

    def _tripped(self, s: BreakerState) -> bool:
        if s.consecutive_failures >= self.policy.failure_threshold:
            return True
        calls = len(s.outcomes)
        if calls < self.policy.min_calls:
            return False
        return sum(failed for _, failed in s.outcomes) / calls >= self.policy.failure_rate

    def _move(self, s: BreakerState, to: State) -> None:
        before, s.state = s.state, to
        if to is State.CLOSED:
            s.consecutive_failures = 0
        if self.on_transition is not None and before is not to:
            self.on_transition(self.name, before, to)
