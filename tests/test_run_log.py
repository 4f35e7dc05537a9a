"""The embedded run log (data_dir/runs.db): durable runs' records and events outlive the registry that drove them,
non-durable runs never touch the file, flush commits before a checkpoint, retention forgets, an orphaned run's log
is served and then said to be unavailable, and a resumed run goes on with the next seq."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from fake_tools import all_tools
from service import events as ev
from service.config import Pacing, RunsConfig
from service.control import RunControl
from service.errors import NotFound, StateUnavailable
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models.scripted import Scenario, ScriptedModel
from service.runs import RunRegistry
from service.state.sqlite_runs import SqliteRunLog

TURNS = [
    {"tool_calls": [{"name": "echo", "input": {"text": "hi"}}]},
    {"text": " ".join(f"w{i}" for i in range(40))},
]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def registry(path: Path, *, pacing_ms: float = 0, clock: Clock | None = None, **config: Any) -> RunRegistry:
    scenario = Scenario.model_validate({"name": "t", "turns": TURNS})
    model = ScriptedModel(scenario, pacing=Pacing(first_token_ms=pacing_ms, token_interval_ms=pacing_ms))
    runs = RunsConfig(**config)
    runlog = SqliteRunLog(path, retention_s=runs.retention_s, max_run_s=runs.max_run_s, clock=clock or time.time)
    return RunRegistry(AgentLoop(model, Executor(all_tools())), runs, runlog=runlog)


def spec(run_id: str, *, durable: bool = False) -> RunSpec:
    return RunSpec(
        run_id=run_id, message="m", model="x", system=None, max_turns=5, max_tokens=10, tools=("echo",), durable=durable
    )


async def finished(reg: RunRegistry, run_id: str, *, durable: bool, caller: str = "alice") -> list[ev.Event]:
    run, _ = reg.start(spec(run_id, durable=durable), caller=caller)
    await run.ended()
    return [entry.event for entry in run.log]


async def test_a_durable_run_outlives_its_registry_and_a_plain_one_never_touches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    reg = registry(path)
    plain = await finished(reg, "run_plain", durable=False)
    assert not path.exists(), "a process with no durable run never creates the file"
    events = await finished(reg, "run_kept", durable=True)
    await reg.close()

    after = registry(path)  # a restart: nothing in memory
    try:
        record = await after.record("run_kept", "alice")
        assert (record.state, record.last_seq) == ("succeeded", len(events))
        assert isinstance(record.outcome, ev.FinalResponse) and record.outcome == events[-1]
        mirror = await after.watch("run_kept", "alice", after_seq=0)
        replayed = [entry async for entry in mirror.follow(0, coalesce_lag=10_000)]
        assert [e.seq for e in replayed] == list(range(1, len(events) + 1))
        assert [e.event for e in replayed] == events
        tail = [entry.seq async for entry in mirror.follow(len(events) - 2)]
        assert tail == [len(events) - 1, len(events)]
        with pytest.raises(NotFound):
            await after.record("run_kept", "mallory")  # another caller's run: as unknown
        with pytest.raises(NotFound):
            await after.record("run_plain", "alice")
        assert len(plain) > 3
    finally:
        await after.close()


async def test_flush_commits_what_the_run_logged_before_it_returns(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    reg = registry(path, pacing_ms=5)
    try:
        run, _ = reg.start(spec("run_f", durable=True), caller="alice")
        await run.reached(8)
        assert reg.runlog is not None
        flushed = len(run.log)  # the run goes on logging while flush waits: what it had logged when asked
        await reg.runlog.flush(run)
        with sqlite3.connect(path) as db:  # another connection sees the commit
            rows = db.execute("SELECT first_seq, last_seq FROM events WHERE run_id = 'run_f' ORDER BY last_seq")
            seqs = [seq for first, last in rows for seq in range(first, last + 1)]
            (last,) = db.execute("SELECT last_seq FROM runs WHERE run_id = 'run_f'").fetchone()
        assert seqs == list(range(1, last + 1)) and last >= flushed
        await run.ended()
    finally:
        await reg.close()


async def test_retention_forgets_an_ended_run_and_a_running_one_later(tmp_path: Path) -> None:
    path, clock = tmp_path / "runs.db", Clock()
    reg = registry(path, clock=clock, retention_s=60, max_run_s=600)
    try:
        await finished(reg, "run_r", durable=True)
        assert reg.runlog is not None
        log = reg.runlog
        await log.writer.flush(reg.runs["run_r"])
        assert await log.record("run_r") is not None
        clock.now += 61
        assert await log.record("run_r") is None
    finally:
        await reg.close()


async def test_an_orphaned_run_is_replayed_then_unavailable_and_a_resumed_one_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    log = SqliteRunLog(path, retention_s=60, max_run_s=600)
    run = log.new_run(spec("run_o"), RunControl(), caller="alice", key="", fingerprint="")
    run.append(ev.RunStarted(model="x", tools=(), max_turns=5))
    for i in range(5):
        run.append(ev.TextDelta(text=f"t{i}", turn=1))
    await log.flush(run)
    await log.close()  # the process "dies" with the run running

    log = SqliteRunLog(path, retention_s=60, max_run_s=600, resume_wait_s=0)  # nothing resumes it here
    try:
        record = await log.record("run_o")
        assert record is not None and (record.state, record.last_seq) == ("queued", 6)
        mirror = await log.mirror(record)
        seen = []
        with pytest.raises(StateUnavailable, match="not driven"):
            async for entry in mirror.follow(0):
                seen.append(entry.seq)
        assert seen == [1, 2, 3, 4, 5, 6]
        with pytest.raises(StateUnavailable):
            await log.cancel(record, after_turn=False, wait_s=1)

        found = await log.history("run_o")
        assert found is not None
        resumed = log.new_run(spec("run_o"), RunControl(), caller="alice", key="", fingerprint="", history=found[1])
        resumed.append(ev.TextDelta(text="after", turn=2))
        await log.flush(resumed)
        again = await log.history("run_o")
        assert again is not None
        assert [e.seq for e in again[1]] == list(range(1, 8)) and again[1][-1].event == ev.TextDelta(
            text="after", turn=2
        )
    finally:
        await log.close()


async def test_the_log_costs_microseconds_per_event(tmp_path: Path) -> None:
    """CPU per event added by the log: unpaced runs, durable against plain, in turns (process CPU, all threads)."""

    async def cpu_per_event(durable: bool, reg: RunRegistry, n: int) -> float:
        before, events = time.process_time(), 0
        runs = [reg.start(spec(f"run_{durable}_{i}", durable=durable), caller="a")[0] for i in range(n)]
        for run in runs:
            await run.ended()
            events += len(run.log)
        if reg.runlog is not None and durable:
            for run in runs:
                await reg.runlog.flush(run)
        return (time.process_time() - before) / events

    reg = registry(tmp_path / "runs.db")
    try:
        await cpu_per_event(True, reg, 20)  # warm: the file opened, code paths hot
        plain, durable = [], []
        for _ in range(3):
            plain.append(await cpu_per_event(False, reg, 50))
            durable.append(await cpu_per_event(True, reg, 50))
        base, kept = sorted(plain)[1] * 1e6, sorted(durable)[1] * 1e6
        added = kept - base
        print(f"\nrun log: {base:.1f} µs/event plain, {kept:.1f} durable: +{added:.1f}")
        assert added < 100, "the log should cost tens of microseconds an event at most"
    finally:
        await reg.close()


async def test_the_writer_retries_a_failed_round_without_losing_events(tmp_path: Path) -> None:
    path = tmp_path / "runs.db"
    log = SqliteRunLog(path, retention_s=60, max_run_s=600)
    real, failures = log._write_sync, [1]

    def failing(chunks: Any) -> None:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("disk I/O error")
        real(chunks)

    log._write_sync = failing  # type: ignore[method-assign]
    try:
        run = log.new_run(spec("run_w"), RunControl(), caller="alice", key="", fingerprint="")
        for i in range(3):
            run.append(ev.TextDelta(text=f"t{i}", turn=1))
        await asyncio.wait_for(log.flush(run), 5)
        found = await log.history("run_w")
        assert found is not None and [e.seq for e in found[1]] == [1, 2, 3]
    finally:
        await log.close()


async def test_a_durable_runs_streams_are_sent_only_what_the_file_holds(tmp_path: Path) -> None:
    """No caller may hold a seq a restart would reuse: past `run_started` (which a restart makes the same), a durable
    stream is sent an event once a round has committed it."""
    reg = registry(tmp_path / "runs.db", pacing_ms=1)
    try:
        run, _ = reg.start(spec("run_s", durable=True), caller="alice")
        assert reg.runlog is not None
        sent = 0
        async for entry in run.follow(0, coalesce_lag=10_000):
            sent += 1
            if entry.seq == 1:
                assert reg.runlog.writer.rounds == 0  # the first event at once, before any write
                continue
            record = await reg.runlog.record("run_s")
            assert record is not None and record.last_seq >= entry.seq
        assert sent == len(run.log) > 10
    finally:
        await reg.close()


async def test_a_run_in_the_store_queue_is_followed_from_its_claim(tmp_path: Path) -> None:
    """`durable.queue: store`: a run logged as queued is not one a dead process left (UNAVAILABLE) but one the queue
    hands over later: a watcher waits for it, past the start's window, and follows it once it is revived."""
    log = SqliteRunLog(tmp_path / "runs.db", retention_s=60, max_run_s=600, resume_wait_s=0)
    log.store_queue = True
    try:
        run = log.new_run(spec("run_q"), RunControl(), caller="alice", key="", fingerprint="")
        run.append(ev.RunStarted(model="x", tools=(), max_turns=5))
        await log.flush(run)
        record = await log.record("run_q")
        assert record is not None and record.state == "queued"
        following = asyncio.create_task(log.mirror(record))
        await asyncio.sleep(0.05)
        assert not following.done()
        revived = await log.revive(spec("run_q"), RunControl(), caller="alice")
        assert await asyncio.wait_for(following, 5) is revived
    finally:
        await log.close()
