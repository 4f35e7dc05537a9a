"""The policies' shared state: what a backend shared by the fleet (Redis: `service/state/redis_limits.py`) answers for
rate limits, breakers and the result cache, and how a process notices that it is unreachable and gets back to it.

The backend is a small protocol so the core never imports a Redis client. Every call of it either answers or raises
`StateUnavailable`; the fleet policies (`fleet.py`, `fleet_breaker.py`) then go on with their process-local twin, and
`Reachability` says so once per transition (a log line, `agent_state_degraded_total{part}`, the
`agent_state_unreachable{part}` gauge) and probes the backend in the background until it answers again: while degraded
no call waits on an unreachable store.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from service import telemetry
from service.policy.breaker import State
from tools.policy import BreakerPolicy, RateLimitPolicy

log = logging.getLogger(__name__)


class StateUnavailable(Exception):
    """The shared state did not answer (refused, timed out, or refused the command): use the process's own."""


@dataclass(frozen=True, slots=True)
class Take:
    """The shared bucket's answer to one call: go after `wait_s` (0: at once), or refused (`wait_s` None). `turn`
    numbers a waiter's reservation, so that a waiter cancelled before its turn can give its token back."""

    wait_s: float | None
    turn: int = 0


@dataclass(frozen=True, slots=True)
class BreakerAnswer:
    """A shared breaker's state after a script ran: admitted (as the trial or not), the epoch, the state before and
    after it (a transition when they differ), and, open, how long the cool-down still runs."""

    admitted: bool
    trial: bool
    epoch: int
    before: State
    state: State
    cooldown_left_s: float = 0.0


@dataclass(frozen=True, slots=True)
class BreakerRequest:
    """One request to a shared breaker: admit a call, a call's verdict, or a cancelled trial's release (`epoch`: the
    permit's)."""

    kind: Literal["allow", "success", "failure", "release"]
    epoch: int = 0


class SharedPolicyState(Protocol):
    """Rate-limit buckets, breaker states and cached results the fleet shares. `now` None: the store's own clock."""

    async def take(self, name: str, policy: RateLimitPolicy, now: float | None, count: int) -> list[Take]:
        """The answers to `count` callers, in the order they came."""

    async def give_back(self, name: str, turn: int) -> None: ...

    async def breaker(
        self,
        name: str,
        policy: BreakerPolicy,
        trial_ttl_s: float,
        now: float | None,
        requests: Sequence[BreakerRequest],
    ) -> list[BreakerAnswer]:
        """The answers to one breaker's requests, each made in turn in one atomic step."""

    async def cache_get(self, name: str, key: str) -> bytes | None: ...

    async def cache_put(self, name: str, key: str, value: bytes, ttl_s: float) -> None: ...

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


class Reachability:
    """Whether the shared state answers, as this process last found it. `failed()` when a call found it unreachable:
    the part runs on local state from then on, and a probe every `probe_interval_s` brings it back once `ping`
    answers. One transition, one log line and one count, however many calls fail meanwhile."""

    def __init__(
        self,
        part: str,
        ping: Callable[[], Awaitable[None]],
        *,
        probe_interval_s: float = 1.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.part = part
        self.ping = ping
        self.probe_interval_s = probe_interval_s
        self.sleep = sleep
        self.degraded = False
        self._probe: asyncio.Task[None] | None = None
        self._recovered = asyncio.Event()
        telemetry.STATE_DEGRADED_NOW.labels(part).set(0)

    def failed(self, exc: BaseException) -> None:
        if self.degraded:
            return
        self.degraded = True
        self._recovered.clear()
        telemetry.STATE_DEGRADED.labels(self.part).inc()
        telemetry.STATE_DEGRADED_NOW.labels(self.part).set(1)
        log.warning(
            "shared state unreachable: %s goes on with this process's own until it answers again",
            self.part,
            extra={"part": self.part, "error": f"{type(exc).__name__}: {exc}"[:500]},
        )
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._probe_until_back())

    async def wait_recovered(self) -> None:
        """Until the probe found the shared state answering again (at once when not degraded)."""
        if self.degraded:
            await self._recovered.wait()

    async def _probe_until_back(self) -> None:
        while True:
            await self.sleep(self.probe_interval_s)
            try:
                await self.ping()
            except StateUnavailable:
                continue
            self.degraded = False
            self._recovered.set()
            telemetry.STATE_DEGRADED_NOW.labels(self.part).set(0)
            log.warning("shared state answers again: %s is shared again", self.part, extra={"part": self.part})
            return

    async def aclose(self) -> None:
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            try:
                await self._probe
            except asyncio.CancelledError:
                if (task := asyncio.current_task()) is not None and task.cancelling():
                    raise


@dataclass
class SharedPolicy:
    """What the fleet policies of one process share: the backend, its reachability, and whether tools' result caches
    are the fleet's too (`state.shared_cache`). Built by the composition root, closed by the executor."""

    state: SharedPolicyState
    reach: Reachability
    cache: bool = False
    senders: set[asyncio.Task[None]] = field(default_factory=set)  # the fleet breakers' requests on their way

    async def aclose(self) -> None:
        # a breaker's verdicts go out without their calls waiting for them: let them arrive before the client closes
        while self.senders:
            await asyncio.wait(set(self.senders))
        await self.reach.aclose()
        await self.state.aclose()
