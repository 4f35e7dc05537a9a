"""`service.aio`: waits for cancelled tasks are bounded, and what is abandoned stays referenced and logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from service import aio
from service.aio import Slots


class Stuck:
    """A coroutine or stream that ignores its cancellation until released."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.cancels = 0

    async def hold(self) -> str:
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancels += 1
        return "late"

    async def stream(self) -> AsyncIterator[str]:
        yield "first"
        await self.hold()


async def ended(task: asyncio.Task[object], within: float = 2.0) -> float | None:
    """Seconds `task` took to end, None if it had not after `within` (asyncio.wait_for would itself wait for a
    task that ignores its cancellation)."""
    started = time.monotonic()
    done, _ = await asyncio.wait({task}, timeout=within)
    return time.monotonic() - started if done else None


async def test_closing_a_merge_abandons_a_source_that_ignores_its_cancellation(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = Stuck()
    merged = aio.merge(stuck.stream(), abandon_after_s=0.05, name="source m", fields={"run_id": "run_m"})
    try:
        assert await anext(merged) == "first"
        await asyncio.sleep(0.01)  # the source is holding now
        with caplog.at_level(logging.INFO, logger="service.aio"):
            took = await ended(asyncio.create_task(merged.aclose()))
            assert took is not None and took < 1.0
            warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
            assert warning.getMessage().startswith("task source m did not stop within 0.05 s")
            assert warning.run_id == "run_m"  # type: ignore[attr-defined]
            (task,) = aio.abandoned()  # referenced until it ends
            assert not task.done() and stuck.cancels == 1
            stuck.release.set()
            assert await ended(task) is not None
            await asyncio.sleep(0)  # the done callback
            assert not aio.abandoned()
            end = next(r for r in caplog.records if "ended" in r.getMessage())
            assert end.run_id == "run_m" and end.outcome == "returned"  # type: ignore[attr-defined]
    finally:
        stuck.release.set()


async def test_slots_can_be_overdrawn_and_let_waiters_in_in_order_below_the_capacity() -> None:
    slots = Slots(1)
    await slots.acquire()
    slots.take()  # over the capacity: a continued run goes on at once
    assert slots.taken == 2
    order: list[str] = []

    async def waiter(name: str) -> None:
        await slots.acquire()
        order.append(name)

    first, second = asyncio.create_task(waiter("a")), asyncio.create_task(waiter("b"))
    await asyncio.sleep(0)
    slots.release()  # 1 taken: still at the capacity, nobody in
    await asyncio.sleep(0)
    assert order == [] and slots.taken == 1
    slots.release()
    await first
    assert order == ["a"] and slots.taken == 1 and not second.done()
    second.cancel()  # a waiter cancelled while it waits leaves no trace
    await asyncio.gather(second, return_exceptions=True)
    slots.release()
    assert slots.taken == 0
    await slots.acquire()
    assert slots.taken == 1


async def test_a_slot_granted_to_a_waiter_cancelled_before_it_went_on_goes_to_the_next() -> None:
    slots = Slots(1)
    await slots.acquire()
    cancelled = asyncio.create_task(slots.acquire())
    later = asyncio.create_task(slots.acquire())
    await asyncio.sleep(0)
    slots.release()  # granted to the first waiter ...
    cancelled.cancel()  # ... cancelled before it ran again
    await asyncio.gather(cancelled, return_exceptions=True)
    await asyncio.wait_for(later, 1)
    assert slots.taken == 1
