"""`service.aio`: waits for cancelled tasks are bounded, and what is abandoned stays referenced and logged."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator

import pytest

from service import aio


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
