"""The run registry without gRPC: event log, followers, coalescing, slow subscribers, retention, background queue."""

from __future__ import annotations

import asyncio
import gc
import logging
import types
import weakref
from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import REGISTRY

from fake_tools import Stubborn, all_tools
from service import aio
from service import events as ev
from service.callers import Caller, CallerLimits
from service.config import CallerConfig, Pacing, RunsConfig
from service.control import RunControl
from service.errors import CallerLimited, QueueFull, RunAlreadyEnded, SubscriberTooSlow
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models import base as m
from service.models.scripted import Scenario, ScriptedModel
from service.retention import Retention
from service.run import Entry, Run, RunState
from service.runs import RunRegistry
from tools.base import Tool


def registry(
    turns: list[dict[str, Any]],
    *,
    pacing_ms: float = 0,
    clock: Any = None,
    model: Any = None,
    tools: dict[str, Tool[Any]] | None = None,
    abandon_after_s: float = 0.5,
    **config: Any,
) -> RunRegistry:
    scenario = Scenario.model_validate({"name": "t", "turns": turns})
    model = model or ScriptedModel(scenario, pacing=Pacing(first_token_ms=pacing_ms, token_interval_ms=pacing_ms))
    loop = AgentLoop(model, Executor(tools or all_tools()), abandon_after_s=abandon_after_s)
    kwargs = {"clock": clock} if clock else {}
    return RunRegistry(loop, RunsConfig(**config), **kwargs)


def spec(run_id: str = "run_1", **overrides: Any) -> RunSpec:
    values: dict[str, Any] = dict(
        run_id=run_id, message="m", model="x", system=None, max_turns=5, max_tokens=10, tools=tuple(all_tools())
    )
    values.update(overrides)
    return RunSpec(**values)


WORDS = [{"text": " ".join(f"w{i}" for i in range(200))}]


async def test_open_checks_and_counts_only_a_limited_callers_runs() -> None:
    """A caller without quotas is neither checked nor counted (no done callback); one with a quota is counted from
    its run's start to its driver's end, and refused beyond it."""
    reg = registry([{"text": "done"}])
    limits = CallerLimits()
    free = Caller("free", CallerConfig(name="free"), "none")
    bound = Caller("bound", CallerConfig(name="bound", max_concurrent_runs=1), "none")
    assert not free.limited and bound.limited
    first, created = await reg.open(spec("run_1"), caller=free, limits=limits)
    assert created and limits.active == {}
    held, created = await reg.open(spec("run_2"), caller=bound, limits=limits)
    assert created and limits.active == {"bound": 1}
    with pytest.raises(CallerLimited):
        await reg.open(spec("run_3"), caller=bound, limits=limits)
    assert first.task is not None and held.task is not None
    await asyncio.wait([first.task, held.task])
    await asyncio.sleep(0)  # the done callbacks run in the loop's next round
    assert first.state is held.state is RunState.SUCCEEDED
    assert limits.active == {"bound": 0}
    await reg.close()


async def test_log_has_gapless_seqs_and_followers_see_it_all() -> None:
    reg = registry(WORDS, coalesce_window_s=0)
    run, created = reg.start(spec(), caller="a")
    assert created
    first = [e async for e in run.follow(0, coalesce_lag=10_000)]
    second = [e async for e in run.follow(0, coalesce_lag=10_000)]
    assert [e.seq for e in first] == list(range(1, len(run.log) + 1)) == [e.seq for e in second]
    assert run.state is RunState.SUCCEEDED
    late = [e.seq async for e in run.follow(150, coalesce_lag=10_000)]
    assert late == list(range(151, len(run.log) + 1))
    await reg.close()


async def test_text_deltas_close_together_are_merged_at_the_source_and_the_text_is_unchanged() -> None:
    reg = registry(WORDS, coalesce_window_s=0.05, coalesce_max_bytes=40)
    run, _ = reg.start(spec(), caller="a")
    entries = [e async for e in run.follow(0)]
    deltas = [e.event for e in entries if isinstance(e.event, ev.TextDelta)]
    assert "".join(d.text for d in deltas) == WORDS[0]["text"]
    assert deltas[0].text == "w0 "  # the first token is not held back
    assert 1 < len(deltas) < 200 and max(len(d.text) for d in deltas) <= 40 + 5
    await reg.close()


async def test_a_reader_that_falls_behind_gets_merged_deltas_then_is_dropped() -> None:
    reg = registry(WORDS, coalesce_window_s=0)
    run, _ = reg.start(spec(), caller="a")
    assert run.task is not None
    await run.task  # the whole log is there; a reader from 0 is 200+ events behind
    merged = [e async for e in run.follow(0, coalesce_lag=5, max_lag=10_000)]
    text = [e for e in merged if isinstance(e.event, ev.TextDelta)]
    assert len(text) < 10 and text[0].first_seq > 0
    assert "".join(e.event.text for e in text) == WORDS[0]["text"]  # type: ignore[union-attr]
    covered = [s for e in merged for s in range(e.first_seq or e.seq, e.seq + 1)]
    assert covered == list(range(1, len(run.log) + 1))  # merged deliveries still account for every seq
    await reg.close()


def test_a_cursor_merges_from_one_past_its_coalesce_lag_and_drops_past_its_max_lag() -> None:
    run = Run(spec(), RunControl(), caller="a", key="", fingerprint="")
    for i in range(6):
        run.append(ev.TextDelta(turn=1, text=f"w{i} "))
    exact = run.cursor(0, coalesce_lag=6)  # 6 behind: each entry as logged, itself, seq by seq
    assert [exact.take() for _ in range(7)] == [*run.log, None]
    merged = run.cursor(0, coalesce_lag=5).take()  # 6 behind: one delivery for all six
    assert merged is not None and (merged.first_seq, merged.seq, merged.event.text) == (1, 6, "w0 w1 w2 w3 w4 w5 ")
    late = run.cursor(0, coalesce_lag=10, max_lag=2)
    assert late.take() is run.log[0]  # 6 behind, past max_lag, but replaying is not lagging
    for i in range(6, 9):
        run.append(ev.TextDelta(turn=1, text=f"w{i} "))
    with pytest.raises(SubscriberTooSlow):  # 3 logged since it joined, unread: past max_lag
        late.take()


async def test_a_slow_reader_of_a_live_run_is_dropped_with_its_resume_point() -> None:
    reg = registry(WORDS, pacing_ms=0.5, coalesce_window_s=0)
    run, _ = reg.start(spec(), caller="a")
    got = []
    with pytest.raises(SubscriberTooSlow) as info:
        async for entry in run.follow(0, coalesce_lag=10_000, max_lag=20):
            got.append(entry.seq)
            await asyncio.sleep(0.05)  # far slower than the run
    assert info.value.last_seq == got[-1]
    assert f"after_seq={got[-1]}" in str(info.value)
    rest = [e.seq async for e in run.follow(info.value.last_seq, coalesce_lag=10_000)]
    assert got + rest == list(range(1, len(run.log) + 1))
    await reg.close()


async def test_ended_runs_are_forgotten_after_retention() -> None:
    now = [0.0]
    reg = registry([{"text": "hi"}], clock=lambda: now[0], retention_s=60)
    run, _ = reg.start(spec(), caller="a", key="k1")
    assert run.task is not None
    await run.task
    now[0] = 59
    assert reg.sweep() == 0 and reg.find("a", "k1", "") is run
    now[0] = 61
    assert reg.sweep() == 1 and run.id not in reg.runs and reg.find("a", "k1", "") is None
    await reg.close()


async def test_background_queue_is_bounded_and_queued_runs_can_be_cancelled() -> None:
    slow = [{"tool_calls": [{"name": "sleep", "input": {"seconds": 5}}]}, {"text": "ok"}]
    reg = registry(slow, background_max_concurrent=1, background_max_queued=1)
    running, _ = reg.start(spec("run_a"), caller="c", background=True)
    queued, _ = reg.start(spec("run_b"), caller="c", background=True)
    await asyncio.sleep(0.05)
    assert (running.state, queued.state) == (RunState.RUNNING, RunState.QUEUED)
    with pytest.raises(QueueFull, match="background queue is full"):
        reg.start(spec("run_c"), caller="c", background=True)
    reg.cancel(queued)
    assert queued.task is not None
    await queued.task
    assert queued.state is RunState.CANCELLED
    reg.start(spec("run_d"), caller="c", background=True)  # the slot freed up
    await reg.close()


@pytest.mark.parametrize("background", [False, True])
async def test_a_run_cancelled_before_its_driver_first_runs_still_ends(background: bool) -> None:
    reg = registry(WORDS, background_max_concurrent=1, background_max_queued=0)
    active = REGISTRY.get_sample_value("agent_active_runs")
    run, _ = reg.start(spec("run_a"), caller="c", background=background)
    driver = run.task  # once done, the run keeps a finished future in its place
    reg.cancel(run)  # in the same step as start: the driver task is cancelled before its coroutine ever runs
    entries = await asyncio.wait_for(_all(run.follow(0)), 1)
    assert driver is not None and driver.cancelled()
    assert run.state is RunState.CANCELLED
    assert [type(e.event) for e in entries] == [ev.RunStarted, ev.RunFailed]
    assert entries[-1].event == ev.RunFailed(code="CANCELLED", message="cancelled by CancelRun", retryable=False)
    assert REGISTRY.get_sample_value("agent_active_runs") == active
    if background:
        reg.start(spec("run_b"), caller="c", background=True)  # its place in the queue was given back
    await reg.close()


async def test_cancelling_a_run_whose_tool_ignores_it_ends_the_run_within_the_bound() -> None:
    stubborn = Stubborn()
    turns = [{"tool_calls": [{"name": "stubborn", "input": {"text": "x"}}]}, {"text": "never"}]
    reg = registry(turns, tools={**all_tools(), "stubborn": stubborn}, abandon_after_s=0.05)
    run, _ = reg.start(spec(tools=("stubborn",)), caller="a")
    try:
        await asyncio.wait_for(stubborn.running.wait(), 5)
        reg.cancel(run)
        assert run.task is not None
        await asyncio.wait([run.task], timeout=1.0)  # as long as CancelRun waits for the final state
        assert run.state is RunState.CANCELLED
        results = [e.event for e in run.log if isinstance(e.event, ev.ToolResult)]
        assert [(r.name, r.status) for r in results] == [("stubborn", ev.ToolStatus.CANCELLED)]
        last = run.log[-1].event
        assert isinstance(last, ev.RunFailed) and last.code == "CANCELLED"
        assert stubborn.ended == 0  # abandoned, still running
    finally:
        stubborn.release.set()
        await reg.close()


class StuckModel:
    """A model whose stream ignores cancellation: the run's driver itself is stuck, outside any tool call."""

    default_model = "stuck"

    def __init__(self) -> None:
        self.stuck = Stubborn()

    async def stream_turn(self, request: m.TurnRequest) -> AsyncIterator[m.ModelEvent]:
        await self.stuck.hold()
        yield m.TurnEnd(stop_reason="end_turn", content=[], input_tokens=0, output_tokens=0)

    async def aclose(self) -> None:
        pass


async def test_close_abandons_a_run_that_ignores_its_cancellation(caplog: pytest.LogCaptureFixture) -> None:
    model = StuckModel()
    reg = registry(WORDS, model=model, abandon_after_s=0.05)
    run, _ = reg.start(spec(), caller="a")
    try:
        await asyncio.wait_for(model.stuck.running.wait(), 5)
        closing = asyncio.create_task(reg.close())
        with caplog.at_level(logging.WARNING, logger="service.aio"):
            done, _ = await asyncio.wait({closing}, timeout=2)  # not wait_for: it would wait for the run too
        assert done, "close() waited for a run that ignored its cancellation"
        warning = next(r for r in caplog.records if "abandoned" in r.getMessage())
        assert warning.getMessage().startswith("task run run_1 did not stop within 0.1 s")
        assert run.task is not None and run.task in aio.abandoned() and not run.finished
    finally:
        model.stuck.release.set()
    assert run.task is not None
    await asyncio.wait_for(run.task, 5)
    assert run.finished


async def _all(entries: AsyncIterator[Entry]) -> list[Entry]:
    return [e async for e in entries]


def test_retention_forgets_the_oldest_ended_runs_past_their_age_count_or_bytes() -> None:
    kept = Retention(RunsConfig(retention_s=60, max_retained_runs=4, max_retained_bytes=2**20))
    for i in range(4):
        over = kept.add(f"r{i}", "a", float(i), 300_000)  # 1.2 MB in all: over the 1 MiB budget
        assert over is (i == 3)
    assert kept.over(now=4, runs=4) == ["r0"]
    assert kept.bytes == 900_000 and "max_retained_bytes = 1 MiB" in (kept.why_forgotten("r0", "a") or "")
    assert kept.why_forgotten("r0", "b") is None  # another caller's run: nothing said about it
    assert kept.over(now=4, runs=6) == ["r1", "r2"]  # two running runs: 6 > 4 retained
    assert "max_retained_runs = 4" in (kept.why_forgotten("r2", None) or "")
    assert kept.over(now=64, runs=1) == ["r3"]
    assert "retention_s = 60 s" in (kept.why_forgotten("r3", "a") or "")


async def test_an_ended_run_kept_for_watching_holds_its_log_not_its_driver() -> None:
    """Kept runs are scanned by every collection while they are kept (bench.retained): once its driver is done, a
    run lets go of the driver's task (its coroutine, its context) and of the coalescer, and what stands for the task
    is done; input for it is refused as for any ended run."""
    reg = registry([{"text": "done"}])
    run, _ = await reg.open(spec("run_1"), caller=Caller("c", CallerConfig(name="c"), "none"), limits=CallerLimits())
    assert run.task is not None
    driver = weakref.ref(run.task)
    await asyncio.wait([run.task])
    await asyncio.sleep(0)  # the done callbacks run in the loop's next round
    gc.collect()
    assert reg.get("run_1") is run and run.state is RunState.SUCCEEDED and len(run.log) == 4
    assert driver() is None
    assert run.task is not None and run.task.done()
    await run.task  # a caller waiting for the driver of an ended run returns at once
    emit = run.control.inbox.emit
    assert emit is not None
    with pytest.raises(RunAlreadyEnded):
        emit(ev.InputReceived(text="too late", when="asap", sent_by="c"))
    holders = {type(r) for r in gc.get_referrers(run)}  # the driver's closure held it in a cell, the coalescer
    assert types.CellType not in holders and types.MethodType not in holders  # through its bound `append`
    await reg.close()
