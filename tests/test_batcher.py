"""The fleet policies' batcher (`service/policy/batcher.py`) with a `send` of the test's own, and the fleet breaker's
use of its fast path: a lone request goes from its caller's task, what comes meanwhile queues behind it, in order."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from service.policy.batcher import Batcher
from service.policy.breaker import CircuitBreaker, State
from service.policy.fleet_breaker import FleetBreaker
from service.policy.shared import BreakerAnswer, BreakerRequest, Reachability, SharedPolicy, StateUnavailable
from tools.policy import BreakerPolicy


class Store:
    """A `send` that answers each request with its own text upper-cased, noting each batch and the task that sent
    it; `held` set: each batch waits for `go` (cleared again once it passes)."""

    def __init__(self) -> None:
        self.batches: list[tuple[list[str], asyncio.Task[Any] | None]] = []
        self.go = asyncio.Event()
        self.held = False
        self.out = 0  # batches out at once now; never more than one

    async def send(self, batch: list[str]) -> list[str]:
        self.batches.append((list(batch), asyncio.current_task()))
        self.out += 1
        assert self.out == 1, "two batches out at once"
        try:
            if self.held:
                await self.go.wait()
                self.go.clear()
            if "fail" in batch:
                raise StateUnavailable("Timeout reading from 127.0.0.1:6379")
            return [request.upper() for request in batch]
        finally:
            self.out -= 1

    def sent(self) -> list[list[str]]:
        return [batch for batch, _ in self.batches]


async def until(condition: Any) -> None:
    for _ in range(100):  # loop turns, not time
        if condition():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def test_a_lone_request_goes_from_its_callers_task_and_what_comes_meanwhile_queues_behind_it() -> None:
    store = Store()
    store.held = True
    batcher: Batcher[str, str] = Batcher("tool", "test", store.send)
    first = asyncio.create_task(batcher.ask("a", here=True))
    await until(lambda: store.batches)
    later = [asyncio.create_task(batcher.ask(x, here=True)) for x in "bc"]  # something is out: they queue
    await asyncio.sleep(0)
    batcher.post("d")
    assert store.sent() == [["a"]]
    store.go.set()
    assert await first == "A"
    await until(lambda: len(store.batches) == 2)
    store.go.set()
    assert await asyncio.gather(*later) == ["B", "C"]
    await batcher.settle()
    assert store.sent() == [["a"], ["b", "c", "d"]]  # in the order they came, the second after the first's answer
    (_, own), (_, sender) = store.batches
    assert own is first  # the caller's own task: no task made for it
    assert sender not in (first, *later)


async def test_a_caller_cancelled_during_its_own_send_leaves_the_queue_to_a_sender() -> None:
    store = Store()
    store.held = True
    batcher: Batcher[str, str] = Batcher("tool", "test", store.send)
    first = asyncio.create_task(batcher.ask("a", here=True))
    await until(lambda: store.batches)
    behind = asyncio.create_task(batcher.ask("b"))
    await asyncio.sleep(0)
    batcher.post("c")
    await asyncio.sleep(0)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    store.go.set()  # the requests behind it go out, from a sender, with nothing lost
    assert await behind == "B"
    await batcher.settle()
    assert store.sent() == [["a"], ["b", "c"]]
    store.held = False
    assert await batcher.ask("e", here=True) == "E"  # the last batch held two: not sparse, a sender takes it
    assert store.batches[-1][1] is not asyncio.current_task()
    assert await batcher.ask("f", here=True) == "F"  # after a lone one, the fast path is open again
    assert store.batches[-1][1] is asyncio.current_task()


async def test_settle_waits_for_a_callers_own_send_and_what_queued_behind_it() -> None:
    store = Store()
    store.held = True
    batcher: Batcher[str, str] = Batcher("tool", "test", store.send)
    first = asyncio.create_task(batcher.ask("a", here=True))
    await until(lambda: store.batches)
    batcher.post("b")
    settled = asyncio.create_task(batcher.settle())
    await asyncio.sleep(0)
    store.go.set()
    await until(lambda: len(store.batches) == 2)
    assert not settled.done()  # "b" is still out
    store.go.set()
    await settled
    assert await first == "A" and store.sent() == [["a"], ["b"]]


async def test_a_failed_send_from_a_callers_task_fails_the_queued_requests_it_picks() -> None:
    store = Store()
    store.held = True
    dropped: list[str] = []
    batcher: Batcher[str, str] = Batcher(
        "tool", "test", store.send, fails_with=lambda r: r.startswith("x"), dropped=lambda r, _: dropped.append(r)
    )
    first = asyncio.create_task(batcher.ask("fail", here=True))
    await until(lambda: store.batches)
    picked = asyncio.create_task(batcher.ask("x1"))
    kept = asyncio.create_task(batcher.ask("k"))
    await asyncio.sleep(0)
    batcher.post("x2")
    await asyncio.sleep(0)
    store.go.set()
    with pytest.raises(StateUnavailable):
        await first
    with pytest.raises(StateUnavailable):
        await picked  # failed with it, without a round trip of its own
    store.go.set()
    assert await kept == "K"
    await batcher.settle()
    assert store.sent() == [["fail"], ["k"]] and dropped == ["x2"]


class BreakerStore:
    """The breaker part of a shared state: every allow admitted outside a trial, in the state `state`; notes the
    task that sent each batch."""

    def __init__(self) -> None:
        self.state = State.CLOSED
        self.tasks: list[asyncio.Task[Any] | None] = []

    async def breaker(self, *args: Any) -> list[BreakerAnswer]:
        requests: list[BreakerRequest] = args[-1]
        self.tasks.append(asyncio.current_task())
        admitted = self.state is not State.OPEN
        return [BreakerAnswer(admitted, False, 1, self.state, self.state, 30.0) for _ in requests]

    async def ping(self) -> None: ...

    async def aclose(self) -> None: ...


async def test_a_lone_allow_and_success_on_a_circuit_known_closed_go_from_their_callers_task() -> None:
    state = BreakerStore()
    shared = SharedPolicy(state, Reachability("limits", state.ping))  # type: ignore[arg-type]
    breaker = FleetBreaker(CircuitBreaker("tool", BreakerPolicy()), shared, trial_ttl_s=5)
    try:
        permit = await breaker.allow()
        assert permit is not None and permit.shared
        await breaker.success(permit)
        assert state.tasks == [asyncio.current_task()] * 2  # no task and no hop for them
        # known open, an allow may be made the trial: it goes from a sender, which frees a trial its caller gave up
        state.state = State.OPEN
        await breaker.failure(permit)  # (a verdict after its success: the fake store takes it all the same)
        assert breaker.state is State.OPEN
        assert await breaker.allow() is None
        assert state.tasks[-1] is not asyncio.current_task()
    finally:
        await shared.aclose()
