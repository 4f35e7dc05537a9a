"""Merging text deltas at the source: the window, its widening as the event loop nears saturation, and the load
probe."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from service import events as ev
from service import telemetry
from service.coalesce import Coalescer, LoopLoad
from service.config import Pacing, RunsConfig
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models.scripted import Scenario, ScriptedModel
from service.runs import RunRegistry


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class HeldLoad(LoopLoad):
    """A load that stays where the test puts it (the real probe would measure this mostly idle test loop)."""

    async def probe_forever(self) -> None:
        await asyncio.Event().wait()


def delta(text: str) -> ev.TextDelta:
    return ev.TextDelta(turn=1, text=text)


def test_load_estimates_rise_at_once_and_halve_their_way_down() -> None:
    load = LoopLoad()
    load.observe(busy=0.8, lag_s=0.4)
    assert (load.busy, load.lag_s) == (0.8, 0.4)
    assert telemetry.LOOP_BUSY._value.get() == 0.8 and telemetry.LOOP_LAG._value.get() == 0.4
    load.observe(busy=0.0, lag_s=0.0)
    assert (load.busy, load.lag_s) == (0.4, 0.2)
    load.observe(busy=0.9, lag_s=0.0)
    assert (load.busy, load.lag_s) == (0.9, 0.1)


async def test_the_probe_sees_a_busy_and_a_blocked_event_loop() -> None:
    load = LoopLoad(interval_s=0.01)
    probe = asyncio.create_task(load.probe_forever())
    try:
        await asyncio.sleep(0.05)
        assert load.lag_s < 0.05 and load.busy < 0.5  # a loop that mostly waits
        wall, cpu = time.perf_counter(), time.thread_time()
        deadline = wall + 0.15
        while time.perf_counter() < deadline:  # noqa: ASYNC110 -- on purpose: the loop is busy, then blocked
            pass
        # the share of a core the OS gave the spin: 1.0 on an idle machine, less on a shared one (the old fixed
        # bound of 0.5 failed here while other test suites ran on the two cores)
        share = (time.thread_time() - cpu) / (time.perf_counter() - wall)
        for _ in range(3):  # a few turns of the loop, not long enough for the next probe to lower the estimates
            await asyncio.sleep(0)
        # busy is the loop thread's CPU time over the wall time since the probe's last look (at most 10 ms before
        # the spin): about the spin's share, against about 0 for the idle loop above
        assert load.lag_s >= 0.1 and load.busy >= 0.7 * share
    finally:
        probe.cancel()
        await asyncio.gather(probe, return_exceptions=True)


def test_window_grows_with_the_load_between_the_configured_window_and_the_cap() -> None:
    load = LoopLoad()
    coalescer = Coalescer(list.append, window_s=0.01, max_window_s=0.1, max_bytes=1024, clock=Clock(), load=load)
    assert coalescer.window() == 0.01  # idle
    load.busy = 0.5
    assert coalescer.window() == 0.01  # calm: half a core
    load.busy = 0.7
    assert coalescer.window() == pytest.approx(0.055)  # halfway to saturation, halfway to the cap
    load.busy = 1.0
    assert coalescer.window() == 0.1
    load.busy, load.lag_s = 0.0, 0.07
    assert coalescer.window() == 0.07  # a late loop: at least its lag
    load.lag_s = 3.0
    assert coalescer.window() == 0.1
    off = Coalescer(list.append, window_s=0, max_window_s=0.1, max_bytes=1024, clock=Clock(), load=load)
    assert off.window() == 0  # 0 turns merging off, however busy the loop
    fixed = Coalescer(list.append, window_s=0.2, max_window_s=0.1, max_bytes=1024, clock=Clock(), load=LoopLoad())
    assert fixed.window() == 0.2  # the cap never narrows the configured window


async def test_deltas_are_merged_only_while_the_loop_is_busy() -> None:
    sent: list[ev.Event] = []
    clock, load = Clock(), LoopLoad()
    coalescer = Coalescer(sent.append, window_s=0.01, max_window_s=0.1, max_bytes=1024, clock=clock, load=load)
    coalescer.add(delta("a"))
    clock.now = 0.02
    coalescer.add(delta("b"))  # 20 ms after the last one: past the 10 ms window
    assert [e.text for e in sent] == ["a", "b"]  # type: ignore[union-attr]
    load.busy = 1.0  # saturated: the window is now the cap, 100 ms
    clock.now = 0.04
    coalescer.add(delta("c"))
    clock.now = 0.06
    coalescer.add(delta("d"))
    assert len(sent) == 2  # held back
    coalescer.add(ev.Usage(turn=1, input_tokens=1, output_tokens=4, total_input_tokens=1, total_output_tokens=4))
    assert [type(e).__name__ for e in sent] == ["TextDelta", "TextDelta", "TextDelta", "Usage"]
    assert sent[2].text == "cd"  # type: ignore[union-attr]


def registry(load: LoopLoad, **config: Any) -> RunRegistry:
    words = " ".join(f"w{i}" for i in range(50))
    scenario = Scenario.model_validate({"name": "t", "turns": [{"text": words}]})
    model = ScriptedModel(scenario, pacing=Pacing(first_token_ms=2, token_interval_ms=2))
    return RunRegistry(AgentLoop(model, Executor({})), RunsConfig(**config), load=load)


async def texts_sent(load: LoopLoad) -> list[str]:
    reg = registry(load, coalesce_window_s=0.001, coalesce_max_window_s=0.05)
    spec = RunSpec(run_id="run_1", message="m", model="x", system=None, max_turns=2, max_tokens=10, tools=())
    run, _ = reg.start(spec, caller="a")
    entries = [e async for e in run.follow(0, coalesce_lag=10_000)]
    await reg.close()
    return [e.event.text for e in entries if isinstance(e.event, ev.TextDelta)]


async def test_a_busy_process_sends_the_same_text_in_fewer_deltas() -> None:
    idle = await texts_sent(HeldLoad())
    saturated = HeldLoad()
    saturated.busy = 1.0
    busy = await texts_sent(saturated)
    assert "".join(idle) == "".join(busy) == " ".join(f"w{i}" for i in range(50))
    assert len(idle) > 30  # tokens 2 ms apart, window 1 ms: nearly one delta each
    assert len(busy) <= 10 and busy[0] == "w0 "  # window 50 ms; the first token still goes out at once
