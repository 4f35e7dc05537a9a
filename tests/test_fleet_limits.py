"""Rate limits, breakers and the result cache shared through the real Redis: two instances on one key prefix stand for
two replicas (each its own client, as two processes would have). The clock is the store's except where a test injects
one (`FakeClock`, passed as each script's `now`): then no time needs to pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import redis.asyncio as redis
from backends import RedisNamespace

from service.config.stores import StateConfig
from service.policy.breaker import CircuitBreaker, State
from service.policy.cache import ResultCache
from service.policy.fleet import FleetCache, FleetLimiter
from service.policy.fleet_breaker import FleetBreaker
from service.policy.limiter import RateLimiter
from service.policy.shared import Reachability, SharedPolicy, Take
from service.state.redis_client import connect
from service.state.redis_limits import RedisPolicyState
from tools.policy import BreakerPolicy, CachePolicy, RateLimitPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


Replica = Callable[..., SharedPolicy]


@pytest.fixture
async def replica(redis_ns: RedisNamespace) -> AsyncIterator[Replica]:
    """Makes the shared policy state of one more "replica" on the test's prefix; all closed after the test."""
    made: list[SharedPolicy] = []

    def _make(url: str | None = None, *, cache: bool = False, probe_interval_s: float = 1.0) -> SharedPolicy:
        state = RedisPolicyState(connect(StateConfig(url=url or redis_ns.url, timeout_s=1.0)), redis_ns.prefix)
        shared = SharedPolicy(state, Reachability("limits", state.ping, probe_interval_s=probe_interval_s), cache=cache)
        made.append(shared)
        return shared

    yield _make
    for shared in made:
        await shared.aclose()


def limiter(shared: SharedPolicy, clock: FakeClock | None = None, **policy: Any) -> FleetLimiter:
    return FleetLimiter("tool", RateLimiter(RateLimitPolicy(**policy)), shared, clock=clock)


class Sleeps:
    """A `sleep` that returns at once and writes down how long it was asked to sleep."""

    def __init__(self) -> None:
        self.asked: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.asked.append(seconds)


# Rate limits


async def test_two_limiters_hold_the_rate_for_their_sum(replica: Replica) -> None:
    rate, burst, calls = 100.0, 5, 200
    a, b = (limiter(replica(), rate_per_s=rate, burst=burst, max_wait_s=30) for _ in range(2))
    started = time.monotonic()
    waited = await asyncio.gather(*(lim.acquire() for _ in range(calls // 2) for lim in (a, b)))
    elapsed = time.monotonic() - started
    assert None not in waited
    ideal = (calls - burst) / rate  # ~1.95 s; each alone would let its half through in half of it
    assert elapsed >= 0.9 * ideal, f"{calls} calls took {elapsed:.2f} s; at {rate:g}/s the fleet needs {ideal:.2f}"
    assert elapsed < 3 * ideal


async def test_reject_mode_refuses_once_the_fleet_took_the_burst(replica: Replica) -> None:
    a, b = (limiter(replica(), rate_per_s=0.01, burst=2, mode="reject") for _ in range(2))
    assert await a.acquire() == 0.0
    assert await b.acquire() == 0.0
    assert await a.acquire() is None
    assert await b.acquire() is None


async def test_a_wait_past_max_wait_is_refused_at_once(replica: Replica) -> None:
    clock = FakeClock()  # still: the waits are the reservations' alone
    a, b = (limiter(replica(), clock, rate_per_s=10, burst=1, max_wait_s=0.25) for _ in range(2))
    sleeps = Sleeps()
    a.sleep = b.sleep = sleeps
    assert [await a.acquire(), await b.acquire(), await a.acquire(), await b.acquire()] == pytest.approx(
        [0.0, 0.1, 0.2, None]
    )
    assert sleeps.asked == pytest.approx([0.1, 0.2], abs=0.01)  # the refused call never slept


async def test_waiters_are_served_in_the_order_they_came(replica: Replica) -> None:
    clock = FakeClock()
    a, b = (limiter(replica(), clock, rate_per_s=100, burst=1, max_wait_s=10) for _ in range(2))
    done: list[tuple[str, int, float | None]] = []

    async def take(name: str, lim: FleetLimiter, i: int) -> None:
        done.append((name, i, await lim.acquire()))

    async with asyncio.TaskGroup() as tg:
        for i in range(6):
            tg.create_task(take("a", a, i))
            tg.create_task(take("b", b, i))
    for name in "ab":
        mine = [(i, w) for n, i, w in done if n == name]
        assert [i for i, _ in mine] == list(range(6)), "a process's waiters woke out of their order"
        waits = [w for _, w in mine]
        assert waits == sorted(waits), "a later waiter was given an earlier turn"
    assert sorted(w for *_, w in done) == pytest.approx([k / 100 for k in range(12)])  # one turn each, none twice


async def test_callers_that_come_together_share_a_round_trip(replica: Replica) -> None:
    shared = replica()
    lim = limiter(shared, FakeClock(), rate_per_s=1000, burst=1, max_wait_s=10)
    lim.sleep = Sleeps()
    sent: list[int] = []
    take = shared.state.take

    async def counted(name: str, policy: RateLimitPolicy, now: float | None, count: int) -> list[Take]:
        sent.append(count)
        return await take(name, policy, now, count)

    shared.state.take = counted  # type: ignore[method-assign]
    waits = await asyncio.gather(*(lim.acquire() for _ in range(50)))
    assert waits == pytest.approx([k / 1000 for k in range(50)])  # in the order they came
    assert sum(sent) == 50 and len(sent) <= 2, f"{len(sent)} round trips for 50 callers"


async def test_a_cancelled_waiter_gives_its_turn_back(replica: Replica) -> None:
    clock = FakeClock()
    a, b = (limiter(replica(), clock, rate_per_s=10, burst=1, max_wait_s=10) for _ in range(2))
    reserved, forever = asyncio.Event(), asyncio.Event()

    async def sleep_forever(seconds: float) -> None:
        reserved.set()
        await forever.wait()

    b.sleep = sleep_forever
    assert await a.acquire() == 0.0
    waiter = asyncio.create_task(b.acquire())
    reserving = asyncio.create_task(reserved.wait())
    await asyncio.wait({waiter, reserving}, return_when=asyncio.FIRST_COMPLETED)
    assert not waiter.done(), "the second call found a token: the bucket is not the fleet's"
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    a.sleep = Sleeps()
    assert await a.acquire() == pytest.approx(0.1)  # the turn the cancelled waiter had, not the one after it


# Breakers


def breakers(
    replica: Replica, n: int = 2, **policy: Any
) -> tuple[list[FleetBreaker], FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    moves: list[tuple[str, str]] = []
    made = []
    for _ in range(n):
        local = CircuitBreaker("tool", BreakerPolicy(**policy), clock=clock)
        made.append(
            FleetBreaker(
                local,
                replica(),
                trial_ttl_s=30,
                clock=clock,
                on_transition=lambda _, x, y: moves.append((x.value, y.value)),
            )
        )
    return made, clock, moves


async def call(b: FleetBreaker, *, failed: bool) -> None:
    permit = await b.allow()
    assert permit is not None and permit.shared
    await (b.failure(permit) if failed else b.success(permit))
    await b.settle()  # a success goes out without the call waiting: the next step must find it counted


async def test_a_breaker_opened_through_one_replica_refuses_on_the_other(replica: Replica) -> None:
    (a, b), clock, moves = breakers(replica, failure_threshold=2, cooldown_s=10)
    await call(b, failed=True)
    await call(a, failed=True)  # the second in a row for the fleet, the first through a
    assert a.state is State.OPEN
    assert await b.allow() is None and b.state is State.OPEN
    clock.now += 9.9
    assert await a.allow() is None
    assert moves == [("closed", "open")]


@pytest.mark.parametrize("trial_fails", [False, True])
async def test_half_open_admits_one_trial_in_the_fleet_and_its_verdict_holds_for_all(
    replica: Replica, trial_fails: bool
) -> None:
    (a, b, c), clock, moves = breakers(replica, 3, failure_threshold=1, cooldown_s=10)
    await call(a, failed=True)
    clock.now += 10
    permits = await asyncio.gather(*(br.allow() for _ in range(5) for br in (a, b, c)))
    trials = [(i % 3, p) for i, p in enumerate(permits) if p is not None]
    assert len(trials) == 1, f"half-open let {len(trials)} calls through"
    holder, trial = trials[0]
    assert trial is not None and trial.trial
    trier = (a, b, c)[holder]
    await (trier.failure(trial) if trial_fails else trier.success(trial))
    for br in (a, b, c):
        permit = await br.allow()
        assert (permit is None) is trial_fails
        if permit is not None:
            await br.success(permit)
    last = ("half_open", "open") if trial_fails else ("half_open", "closed")
    assert moves == [("closed", "open"), ("open", "half_open"), last]


async def test_a_cancelled_trial_frees_the_slot_for_another_replica(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=1, cooldown_s=5)
    await call(a, failed=True)
    clock.now += 5
    trial = await a.allow()
    assert trial is not None and trial.trial
    assert await b.allow() is None
    await a.release(trial)
    assert await b.allow() is not None


async def test_a_trial_admitted_to_a_cancelled_caller_frees_its_slot(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=1, cooldown_s=5)
    await call(a, failed=True)
    clock.now += 5
    asking = asyncio.ensure_future(a.allow())
    await asyncio.sleep(0)  # its request is queued: it goes out whatever happens to the caller
    asking.cancel()
    await a.settle()
    assert asking.cancelled()
    trial = await b.allow()  # the slot the store gave the cancelled caller was handed back
    assert trial is not None and trial.trial


async def test_a_trial_whose_replica_died_is_replaced_after_its_deadline(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=1, cooldown_s=5)
    await call(a, failed=True)
    clock.now += 5
    lost = await a.allow()  # a's replica dies with the trial slot
    assert lost is not None and lost.trial
    clock.now += 29
    assert await b.allow() is None  # the trial may still be running
    clock.now += 1
    trial = await b.allow()
    assert trial is not None and trial.trial and trial.epoch != lost.epoch
    await a.success(lost)  # too late: it no longer decides
    assert b.state is State.HALF_OPEN and await a.allow() is None
    await b.success(trial)
    assert await a.allow() is not None


async def test_a_verdict_from_before_the_circuit_opened_does_not_decide_the_trial(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=1, cooldown_s=5)
    old = await b.allow()
    assert old is not None
    await call(a, failed=True)
    clock.now += 5
    trial = await a.allow()
    assert trial is not None
    await b.success(old)
    assert await b.allow() is None  # still half-open, the trial still holds the slot
    await b.failure(old)
    await a.success(trial)
    assert a.state is State.CLOSED and await b.allow() is not None


async def test_the_failure_rate_counts_the_calls_of_every_replica(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10)
    await call(a, failed=True)
    await call(b, failed=False)
    await call(a, failed=False)
    assert a.state is State.CLOSED  # 3 calls: under min_calls
    await call(b, failed=True)
    assert b.state is State.OPEN  # 2 of 4, through two replicas (each saw 1 of 2)
    assert await a.allow() is None


async def test_verdicts_sent_together_count_in_turn(replica: Replica) -> None:
    (a, b), clock, moves = breakers(replica, failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10)
    permits = await asyncio.gather(*(a.allow() for _ in range(4)))
    assert all(p is not None for p in permits)
    first, second, third, fourth = (p for p in permits if p is not None)
    # queued in one loop turn, so answered by one script run, in turn: 1 of 3 (under min_calls), then 2 of 4
    await asyncio.gather(a.success(first), a.success(second), a.failure(third), a.failure(fourth))
    assert a.state is State.OPEN and moves == [("closed", "open")]
    assert await b.allow() is None


async def test_calls_leave_the_shared_window(replica: Replica) -> None:
    (a, b), clock, _ = breakers(replica, failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10)
    await call(b, failed=True)
    clock.now += 11  # it leaves the window
    for br, failed in ((a, False), (b, False), (a, True), (b, False), (b, True)):
        await call(br, failed=failed)
    assert b.state is State.CLOSED  # 2 of 5 in the window (3 of 6 with the one that left)
    await call(a, failed=True)
    assert a.state is State.OPEN  # 3 of 6


async def test_a_breaker_sends_the_requests_of_one_loop_turn_in_one_script_run(
    replica: Replica, redis_ns: RedisNamespace
) -> None:
    shared = replica()
    state = shared.state
    assert isinstance(state, RedisPolicyState)
    b = FleetBreaker(CircuitBreaker("tool", BreakerPolicy()), shared, trial_ttl_s=30)
    await call(b, failed=False)  # the scripts are loaded: from here on, one EVALSHA per round trip
    runs = 0
    evalsha = state.client.evalsha

    async def counted(*args: Any) -> Any:
        nonlocal runs
        runs += 1
        return await evalsha(*args)

    state.client.evalsha = counted  # type: ignore[method-assign]
    permits = await asyncio.gather(*(b.allow() for _ in range(10)))
    # ten calls in flight: the first goes at once from its own task (nothing was out, and the traffic was sparse),
    # the nine that came with it in the same loop turn together in one round trip after it
    assert runs == 2
    for permit in permits:
        assert permit is not None
        await b.success(permit)  # a batch of nine was not sparse: not waited for, the ten go out together
    again = await asyncio.gather(*(b.allow() for _ in range(10)))  # asked while the verdicts are out: next batch
    await b.settle()
    assert runs == 4 and all(p is not None for p in again)
    conn = redis.Redis.from_url(redis_ns.url)
    try:
        assert await conn.zcard(f"{redis_ns.prefix}breaker:{{tool}}:calls") == 11  # no verdict lost
    finally:
        await conn.aclose()


# The result cache


async def test_a_result_cached_by_one_replica_is_a_hit_on_the_other(replica: Replica, redis_ns: RedisNamespace) -> None:
    policy = CachePolicy(ttl_s=30)
    a, b = (FleetCache("tool", ResultCache(policy), replica(cache=True)) for _ in range(2))
    assert await b.get("k") == (False, None)
    await a.put("k", {"rows": [1, 2], "none": None})
    assert await b.get("k") == (True, {"rows": [1, 2], "none": None})
    assert len(a.local) == len(b.local) == 0  # in the store, not the processes
    conn = redis.Redis.from_url(redis_ns.url)
    try:
        (key,) = [k async for k in conn.scan_iter(match=f"{redis_ns.prefix}cache:*")]
        assert 0 < await conn.pttl(key) <= 30_000  # the policy's TTL, kept by the store
    finally:
        await conn.aclose()
