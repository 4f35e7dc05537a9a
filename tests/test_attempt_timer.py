"""`attempt.bounded`: the hard timeout armed only once the tool suspends. A tool that answers in its first step
schedules no timer; every other keeps the timeout, the cancel and the values it had under `asyncio.timeout`."""

from __future__ import annotations

import asyncio
import datetime
import time
from typing import Any

import pytest

from service.events import ToolStatus
from service.policy.attempt import attempt, bounded, to_json
from tools.base import CallInfo, Tool

CALL = CallInfo(run_id="r", call_id="c", attempt=1)


class Scripted(Tool[Any]):
    """A tool whose `run` is the coroutine function given."""

    name = "scripted"
    description = "test"

    def __init__(self, run: Any) -> None:
        self._run = run

    async def run(self, args: Any) -> Any:
        return await self._run(args)


def busy(seconds: float) -> None:
    """Holds the loop for `seconds`, as a tool's synchronous work would."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def timers(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The `when` of every timer the running loop schedules from now on."""
    loop = asyncio.get_running_loop()
    scheduled: list[float] = []
    call_at = loop.call_at

    def spy(when: float, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        scheduled.append(when)
        return call_at(when, *args, **kwargs)

    monkeypatch.setattr(loop, "call_at", spy)
    return scheduled


async def test_a_tool_that_answers_at_once_schedules_no_timer(monkeypatch: pytest.MonkeyPatch) -> None:
    scheduled = timers(monkeypatch)

    async def answer(args: Any) -> Any:
        return {"echo": args}

    outcome = await attempt(Scripted(answer), "x", call=CALL, timeout_s=30, retry_timeouts=False)
    assert (outcome.status, outcome.data) == (ToolStatus.OK, {"echo": "x"})
    assert scheduled == []


async def test_a_tool_that_suspends_runs_under_the_deadline_taken_before_its_first_step(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    scheduled = timers(monkeypatch)
    loop = asyncio.get_running_loop()
    before = loop.time()

    async def busy_then_sleep(args: Any) -> Any:
        busy(0.05)  # its first step's own time counts against the timeout
        await asyncio.sleep(0)
        return "done"

    outcome = await attempt(Scripted(busy_then_sleep), None, call=CALL, timeout_s=30, retry_timeouts=False)
    assert outcome.data == "done"
    assert len(scheduled) == 1 and before + 30 <= scheduled[0] < before + 30.05


async def test_a_tool_past_its_deadline_is_cancelled_and_ends_timeout() -> None:
    cleaned: list[str] = []

    async def hang(args: Any) -> Any:
        try:
            await asyncio.sleep(0)  # suspends once and goes on
            await asyncio.Event().wait()
        finally:
            cleaned.append("finally")

    outcome = await attempt(Scripted(hang), None, call=CALL, timeout_s=0.05, retry_timeouts=True)
    assert (outcome.status, outcome.retryable, cleaned) == (ToolStatus.TIMEOUT, True, ["finally"])


async def test_a_first_step_longer_than_the_timeout_ends_timeout_at_its_first_suspension() -> None:
    async def slow_start(args: Any) -> Any:
        busy(0.06)
        await asyncio.sleep(10)

    started = time.monotonic()
    outcome = await attempt(Scripted(slow_start), None, call=CALL, timeout_s=0.05, retry_timeouts=False)
    assert outcome.status is ToolStatus.TIMEOUT and time.monotonic() - started < 1


async def test_a_cancel_from_outside_reaches_the_tool_and_propagates() -> None:
    seen: list[str] = []
    ready = asyncio.Event()

    async def wait(args: Any) -> Any:
        await asyncio.sleep(0)
        ready.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    task = asyncio.create_task(attempt(Scripted(wait), None, call=CALL, timeout_s=30, retry_timeouts=False))
    await ready.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == ["cancelled"]


async def test_values_and_errors_of_awaited_futures_reach_the_tool() -> None:
    loop = asyncio.get_running_loop()
    ok, bad = loop.create_future(), loop.create_future()
    loop.call_soon(ok.set_result, 7)
    loop.call_soon(bad.set_exception, KeyError("k"))

    async def both() -> Any:
        caught = ""
        try:
            await bad
        except KeyError as exc:
            caught = str(exc)
        return await ok, caught

    assert await bounded(both(), loop.time() + 5) == (7, "'k'")


def test_to_json_keeps_json_as_is_and_converts_what_is_not() -> None:
    rows = {"rows": [{"id": 1, "ok": True, "v": 1.5, "none": None, "tags": ["a", {"b": 2}]}]}
    assert to_json(rows) is rows  # already JSON: no round trip
    day = datetime.date(2026, 12, 3)
    assert to_json({"rows": [{"day": day}]}) == {"rows": [{"day": "2026-12-03"}]}
    assert to_json([{1: "x"}]) == [{"1": "x"}]  # a key JSON cannot have, as json.dumps writes it
    assert to_json({"t": (1, 2)}) == {"t": [1, 2]}
