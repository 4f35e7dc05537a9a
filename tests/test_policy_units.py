"""The policy units on their own: breaker transitions on a fake clock, limiter wait vs reject, cache TTL, backoff,
and policy resolution from the tool's declaration and the config."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

from fake_tools import policy_tools
from service.policy.breaker import CircuitBreaker, State
from service.policy.cache import ResultCache, cache_key
from service.policy.config import PolicyError, resolve
from service.policy.limiter import RateLimiter
from service.policy.retry import Backoff, jittered_backoff, wait_after
from tools.policy import BreakerPolicy, CachePolicy, RateLimitPolicy, RetryPolicy


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def breaker(**policy: Any) -> tuple[CircuitBreaker, FakeClock, list[tuple[str, str]]]:
    clock = FakeClock()
    moves: list[tuple[str, str]] = []
    b = CircuitBreaker(
        "t", BreakerPolicy(**policy), clock=clock, on_transition=lambda _, a, b: moves.append((a.value, b.value))
    )
    return b, clock, moves


def call(b: CircuitBreaker, *, failed: bool) -> None:
    """One admitted call to its end."""
    permit = b.allow()
    assert permit is not None
    b.failure(permit) if failed else b.success(permit)


def test_breaker_opens_after_consecutive_failures_and_recovers_through_half_open() -> None:
    b, clock, moves = breaker(failure_threshold=3, cooldown_s=10)
    for _ in range(2):
        call(b, failed=True)
    assert b.state is State.CLOSED
    call(b, failed=False)  # a success resets the streak
    for _ in range(3):
        call(b, failed=True)
    assert b.state is State.OPEN and not b.allow()
    clock.now += 9.9
    assert not b.allow()
    clock.now += 0.1
    assert b.state is State.HALF_OPEN
    trial = b.allow()  # the one trial call
    assert trial is not None and trial.trial
    assert not b.allow()  # nobody else while it runs
    b.success(trial)
    assert b.state is State.CLOSED and b.allow()
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_failed_trial_reopens_and_a_cancelled_trial_frees_the_slot() -> None:
    b, clock, moves = breaker(failure_threshold=1, cooldown_s=5)
    call(b, failed=True)
    clock.now += 5
    call(b, failed=True)  # the trial
    assert b.state is State.OPEN and not b.allow()
    clock.now += 5
    trial = b.allow()
    assert trial is not None
    b.release(trial)  # cancelled: no verdict, the next caller may try
    assert b.allow()
    assert moves[-2:] == [("half_open", "open"), ("open", "half_open")]


def test_only_the_trial_frees_the_trial_slot() -> None:
    b, clock, _ = breaker(failure_threshold=1, cooldown_s=5)
    old = b.allow()  # admitted while closed, still running
    assert old is not None and not old.trial
    call(b, failed=True)
    clock.now += 5
    trial = b.allow()
    assert trial is not None and trial.trial
    b.release(old)  # the old call is cancelled: the slot is not its to free
    assert not b.allow()
    b.release(trial)
    assert b.allow()


@pytest.mark.parametrize("failed", [False, True])
def test_a_verdict_from_before_the_circuit_opened_does_not_decide_the_trial(failed: bool) -> None:
    b, clock, moves = breaker(failure_threshold=1, cooldown_s=5)
    old = b.allow()
    assert old is not None
    call(b, failed=True)
    clock.now += 5
    trial = b.allow()
    assert trial is not None
    # The old call started before the outage was seen: it tells nothing of the tool after the cool-down.
    b.failure(old) if failed else b.success(old)
    assert b.state is State.HALF_OPEN and not b.allow()  # the trial still holds the slot, nobody else is let in
    b.success(trial)  # the trial decides
    assert b.state is State.CLOSED
    assert moves == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failure_from_an_earlier_closed_period_does_not_count_in_the_next() -> None:
    b, clock, _ = breaker(failure_threshold=2, cooldown_s=5)
    old = b.allow()
    assert old is not None
    call(b, failed=True)
    call(b, failed=True)
    clock.now += 5
    call(b, failed=False)  # the trial closes the circuit
    call(b, failed=True)
    b.failure(old)  # would be the second failure in a row of the new period
    assert b.state is State.CLOSED


def test_breaker_opens_on_failure_rate_over_the_window() -> None:
    b, clock, _ = breaker(failure_threshold=100, failure_rate=0.5, min_calls=4, window_s=10)
    for failed in (True, False, True):
        call(b, failed=failed)
    assert b.state is State.CLOSED  # 3 calls: under min_calls
    call(b, failed=False)
    assert b.state is State.CLOSED  # 2/4 but the last was a success: rate is checked on failures
    call(b, failed=True)
    assert b.state is State.OPEN  # 3/5 >= 0.5
    b2, clock2, _ = breaker(failure_threshold=100, failure_rate=0.5, min_calls=2, window_s=10)
    call(b2, failed=True)
    clock2.now += 11  # the old failure left the window
    call(b2, failed=False)
    call(b2, failed=True)
    assert b2.state is State.OPEN  # 1/2 in the window
    b3, clock3, _ = breaker(failure_threshold=100, failure_rate=0.6, min_calls=2, window_s=10)
    call(b3, failed=True)
    clock3.now += 11
    call(b3, failed=False)
    call(b3, failed=False)
    call(b3, failed=True)
    assert b3.state is State.CLOSED  # 1/3 in the window, the first failure expired


class _Unscannable(deque[tuple[float, bool]]):
    """A window that fails the test if anything walks it: appends and pops at the ends only."""

    def __iter__(self) -> Iterator[tuple[float, bool]]:
        raise AssertionError("the breaker walked its whole window")


def test_failure_rate_costs_the_same_however_full_the_window() -> None:
    """At 1000 calls/s over a 60 s window, summing the window on every failure cost ~1-2 ms each: a third of the
    calls failing took most of the event loop. The rate is kept as a count, never summed."""
    b, clock, _ = breaker(failure_threshold=10**9, failure_rate=0.9, min_calls=10, window_s=60)
    b.current.outcomes = _Unscannable()
    for i in range(3_000):
        clock.now += 0.001
        call(b, failed=i % 3 == 0)
    assert b.state is State.CLOSED  # a third failed: under the rate
    clock.now += 61  # all of it leaves the window, its failures with it
    for _ in range(9):
        call(b, failed=False)
    call(b, failed=True)
    assert b.state is State.CLOSED  # 1/10
    for _ in range(80):
        call(b, failed=True)
    assert b.state is State.OPEN  # 81/90


def limiter(**policy: Any) -> tuple[RateLimiter, FakeClock, list[float]]:
    """A limiter on a fake clock whose sleeps are recorded and never end (the test cancels them)."""
    clock = FakeClock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        await asyncio.Event().wait()

    return RateLimiter(RateLimitPolicy(**policy), clock=clock, sleep=sleep), clock, slept


async def test_limiter_allows_the_burst_then_refills_at_the_rate() -> None:
    lim, clock, slept = limiter(rate_per_s=2, burst=3, mode="reject")
    assert [await lim.acquire() for _ in range(4)] == [0.0, 0.0, 0.0, None]
    clock.now += 0.5  # one token
    assert [await lim.acquire() for _ in range(2)] == [0.0, None]
    clock.now += 100  # never more than the burst
    assert [await lim.acquire() for _ in range(4)] == [0.0, 0.0, 0.0, None]
    assert slept == []


async def test_limiter_waiters_are_served_in_order_and_a_newcomer_queues_behind_them() -> None:
    lim, clock, slept = limiter(rate_per_s=10, burst=1, mode="wait", max_wait_s=1)
    assert await lim.acquire() == 0.0
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert slept == pytest.approx([0.1, 0.2, 0.3])
    clock.now += 0.15  # the first waiter's turn has come (its timer may not have fired yet: a busy loop)
    newcomer = asyncio.create_task(lim.acquire())  # aiolimiter let it take the first waiter's token
    await asyncio.sleep(0)
    assert slept[-1] == pytest.approx(0.25)  # after the third waiter, at 0.4
    for task in [*waiters, newcomer]:
        task.cancel()
    await asyncio.gather(*waiters, newcomer, return_exceptions=True)


async def test_limiter_refuses_at_once_a_turn_beyond_max_wait() -> None:
    """It waited the whole max_wait_s for capacity it could tell would come too late, then refused."""
    lim, _, slept = limiter(rate_per_s=0.5, burst=1, mode="wait", max_wait_s=1)
    assert await lim.acquire() == 0.0
    assert await lim.acquire() is None  # the next token comes in 2 s
    assert slept == []


async def test_a_cancelled_waiter_gives_its_token_back() -> None:
    lim, clock, slept = limiter(rate_per_s=1, burst=1, mode="wait", max_wait_s=5)
    assert await lim.acquire() == 0.0
    first, second = asyncio.create_task(lim.acquire()), asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    second.cancel()
    await asyncio.gather(second, return_exceptions=True)
    third = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert slept == [1.0, 2.0, 2.0]  # the third is not kept waiting for the cancelled second's token
    for task in (first, third):
        task.cancel()
    await asyncio.gather(first, third, return_exceptions=True)
    clock.now += 2  # both gone: the bucket is full again, not in debt
    assert await lim.acquire() == 0.0


async def test_a_cancelled_waiter_with_others_behind_it_does_not_hand_out_their_turn_again() -> None:
    """The third waiter's turn was counted after the second's: given the second's token back, a newcomer took the
    third's turn as well, two calls at once where the burst allows one."""
    lim, _, slept = limiter(rate_per_s=1, burst=1, mode="wait", max_wait_s=10)
    assert await lim.acquire() == 0.0
    waiters = [asyncio.create_task(lim.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    assert slept == [1.0, 2.0, 3.0]
    waiters[1].cancel()  # the first and the third keep their turns, at 1 and 3
    await asyncio.gather(waiters[1], return_exceptions=True)
    newcomer = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert slept[-1] == 4.0  # not 3.0, the third waiter's turn
    for task in (waiters[2], newcomer):  # all behind the first leave: their turns, the second's too, come back
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    late = asyncio.create_task(lim.acquire())
    await asyncio.sleep(0)
    assert slept[-1] == 2.0  # behind the first waiter only
    for task in (waiters[0], late):
        task.cancel()
    await asyncio.gather(waiters[0], late, return_exceptions=True)


async def test_limiter_really_waits_with_the_default_clock() -> None:
    real = RateLimiter(RateLimitPolicy(rate_per_s=20, burst=1, mode="wait", max_wait_s=1))
    assert await real.acquire() == 0.0
    started = time.monotonic()
    assert await real.acquire() == pytest.approx(0.05, abs=0.005)
    assert time.monotonic() - started >= 0.04


def test_cache_expires_and_is_bounded() -> None:
    clock = FakeClock()
    cache = ResultCache(CachePolicy(ttl_s=10, max_entries=2), clock=clock)
    cache.put("a", None)
    assert cache.get("a") == (True, None)  # None is a result too
    clock.now += 10
    assert cache.get("a") == (False, None)
    cache.put("a", 1)
    cache.put("b", 2)
    cache.get("a")  # a is now the most recently used
    cache.put("c", 3)
    assert cache.get("b") == (False, None) and cache.get("a") == (True, 1) and len(cache) == 2


def test_cache_key_is_canonical() -> None:
    assert cache_key("t", {"b": 1, "a": [1, 2]}) == cache_key("t", {"a": [1, 2], "b": 1})
    assert cache_key("t", {"a": 1}) != cache_key("u", {"a": 1})


def test_backoff_grows_exponentially_with_jitter_that_stays_on_at_the_cap() -> None:
    backoff = Backoff(RetryPolicy(attempts=5, initial_backoff_s=0.1, max_backoff_s=0.5))
    for attempt, low in [(1, 0.1), (2, 0.2), (3, 0.4)]:
        wait = backoff.wait(attempt)
        assert low <= wait <= min(low + 0.1, 0.5)
    at_cap = {backoff.wait(6) for _ in range(20)}
    assert all(0.4 <= wait <= 0.5 for wait in at_cap)
    assert len(at_cap) > 1  # callers that reached the cap still spread out (tenacity's jitter is capped away)


def test_model_turn_retries_keep_their_jitter_at_the_cap() -> None:
    strategy = jittered_backoff(0.5, 8.0, 1.0)
    waits = {wait_after(strategy, 10) for _ in range(20)}
    assert all(7.0 <= wait <= 8.0 for wait in waits) and len(waits) > 1
    assert 0.5 <= wait_after(strategy, 1) <= 1.5
    assert wait_after(jittered_backoff(0.1, 0.05, 1.0), 1) == 0.05  # a first wait above the cap: the cap, no jitter
    assert 2.0 <= wait_after(jittered_backoff(2.0, 2.5, 1.0), 1) <= 2.5  # the jitter fits between first wait and cap


def test_config_overrides_the_tools_policy_field_by_field() -> None:
    tools = policy_tools()
    policies = resolve(tools, {"flaky": {"retry": {"attempts": 4}, "fallback": "backup", "breaker": None}})
    flaky = policies["flaky"]
    assert flaky.retry.attempts == 4 and flaky.retry.initial_backoff_s == 0.2  # the rest kept
    assert flaky.fallback == "backup" and flaky.breaker is None
    assert policies["echo"] == tools["echo"].policy


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"nope": {}}, "policies name unknown tools: nope"),
        ({"flaky": {"fallback": "nope"}}, "refers to 'nope'"),
        ({"flaky": {"requires": ["flaky"]}}, "refers to 'flaky'"),
        ({"flaky": {"cache": {"ttl_s": 5}}}, "only allowed on a tool without side effects"),
        ({"flaky": {"retry": {"attempts": 0}}}, "invalid policy for flaky"),
    ],
)
def test_bad_policy_config_is_refused(overrides: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        resolve(policy_tools(), overrides)


async def test_take_spends_the_burst_without_waiting_then_acquire_queues_behind_it() -> None:
    clock = FakeClock()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    limiter = RateLimiter(RateLimitPolicy(rate_per_s=2, burst=2, max_wait_s=5), clock=clock, sleep=sleep)
    assert limiter.take() and limiter.take()
    assert not limiter.take()  # nothing at hand: the caller goes to `acquire`
    assert await limiter.acquire() == 0.5 and await limiter.acquire() == 1.0  # their turns, in order
    clock.now += 1.0
    assert not limiter.take()  # the two tokens that came were the waiters'
    clock.now += 0.5
    assert limiter.take()
    assert waits == [0.5, 1.0]
