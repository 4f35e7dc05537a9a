"""The embedded run log (in data_dir/durable.db, or runs.db alone): durable runs' records and events outlive the
registry that drove them, non-durable runs never touch the file, flush commits before a checkpoint, retention
forgets, an orphaned run's log is served and then said to be unavailable, a resumed run goes on with the next seq,
a durable stream goes ahead of the file, and a checkpoint commits with the events before it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fake_tools import all_tools
from service import events as ev
from service.config import Pacing, RunsConfig
from service.control import RunControl
from service.durable.base import DurableRun, Step
from service.durable.sqlite import SqliteCheckpointStore
from service.errors import NotFound, StateUnavailable
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models.scripted import Scenario, ScriptedModel
from service.runs import RunRegistry
from service.state.sqlite_log import AHEAD
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

    def failing(chunks: Any, riders: Any = ()) -> None:
        if failures:
            failures.pop()
            raise sqlite3.OperationalError("disk I/O error")
        real(chunks, riders)

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


def held_log(tmp_path: Path) -> tuple[SqliteRunLog, threading.Event]:
    """A run log whose writing thread waits until the returned gate is set: what the file holds stays put."""
    log = SqliteRunLog(tmp_path / "runs.db", retention_s=60, max_run_s=600)
    real, gate = log._write_sync, threading.Event()

    def held(chunks: Any, riders: Any = ()) -> None:
        gate.wait(10)
        real(chunks, riders)

    log._write_sync = held  # type: ignore[method-assign]
    return log, gate


async def test_a_durable_runs_streams_go_ahead_of_the_file_and_its_end_waits_for_it(tmp_path: Path) -> None:
    """A durable stream is sent events as they form, while no round has committed them (up to AHEAD past the file);
    its closing event only once the file holds it: a caller that saw the end, a restart keeps the end."""
    log, gate = held_log(tmp_path)
    run = log.new_run(spec("run_a", durable=True), RunControl(), caller="alice", key="", fingerprint="")
    stream = aiter(run.follow(0, coalesce_lag=10_000))
    try:
        for i in range(AHEAD + 10):
            run.append(ev.TextDelta(text=f"t{i}", turn=1))
        got = [(await asyncio.wait_for(anext(stream), 1)).seq for _ in range(AHEAD + 1)]
        assert got == list(range(1, AHEAD + 2)) and log.writer.rounds == 0  # none of them is in the file yet
        ahead = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not ahead.done(), "no further than AHEAD past the file"
        gate.set()
        assert (await asyncio.wait_for(ahead, 5)).seq == AHEAD + 2
        for _ in range(8):
            await asyncio.wait_for(anext(stream), 1)
        await asyncio.wait_for(log.flush(run), 5)  # all out: the next round is the end's
        gate.clear()
        run.append(
            ev.FinalResponse(
                text="done",
                stop_reason="end_turn",
                turns=1,
                tool_calls=0,
                input_tokens=0,
                output_tokens=0,
                duration_s=0,
            )
        )
        run.finish()
        end = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not end.done(), "the closing event waits for the file"
        gate.set()
        assert type((await asyncio.wait_for(end, 5)).event) is ev.FinalResponse
        record = await log.record("run_a")
        assert record is not None and record.state == "succeeded"
    finally:
        gate.set()
        await stream.aclose()
        await log.close()


async def test_a_watch_from_a_seq_a_crash_may_have_lost_starts_at_run_recovered(tmp_path: Path) -> None:
    """After a restart a caller may hold seqs up to AHEAD past the last kept one, which the resumed run gave to other
    events: a WatchRun from such a seq starts at the `run_recovered` (which tells it what to drop); others as asked."""
    log = SqliteRunLog(tmp_path / "runs.db", retention_s=60, max_run_s=600)
    try:
        run = log.new_run(spec("run_r", durable=True), RunControl(), caller="alice", key="", fingerprint="")
        for i in range(9):
            run.append(ev.TextDelta(text=f"t{i}", turn=1))
        run.append(ev.RunRecovered(step_no=1, turn=1, seq=4, reason="crash"))  # seq 10: 1..9 were kept
        for i in range(AHEAD + 20):
            run.append(ev.TextDelta(text=f"u{i}", turn=2))
        assert [run.resume_after(m) for m in (0, 5, 9)] == [0, 5, 9]
        assert [run.resume_after(m) for m in (10, 11, 9 + AHEAD)] == [9, 9, 9]
        assert run.resume_after(10 + AHEAD) == 10 + AHEAD  # beyond what the dead process can have sent
        plain = log.new_run(spec("run_p"), RunControl(), caller="alice", key="", fingerprint="")
        plain.log.extend(run.log)
        plain.ahead = 0  # the fleet's runs: their streams never go ahead of the store
        assert plain.resume_after(11) == 11
    finally:
        await log.close()


async def joined(tmp_path: Path) -> tuple[SqliteCheckpointStore, SqliteRunLog]:
    store = SqliteCheckpointStore(tmp_path / "durable.db", "node-1")
    log = SqliteRunLog(tmp_path / "runs.db", retention_s=60, max_run_s=600)
    log.join(store)
    await store.open()
    return store, log


async def test_a_checkpoint_commits_with_the_events_before_it_in_one_transaction(tmp_path: Path) -> None:
    """One node: the log's tables are in durable.db, and a checkpoint rides the log's next round: no flush first, one
    commit for the events and the step; a step that fails to write takes its round's events back with it."""
    store, log = await joined(tmp_path)
    try:
        run = log.new_run(spec("run_j", durable=True), RunControl(), caller="alice", key="", fingerprint="")
        await store.begin(DurableRun(run_id="run_j", caller="alice", owner="node-1", state="running", request={}))
        rounds = log.writer.rounds
        for i in range(5):
            run.append(ev.TextDelta(text=f"t{i}", turn=1))
        await store.put(Step(run_id="run_j", step_no=1, kind="turn", key="turn:1", value={"v": 1}, seq=len(run.log)))
        assert log.writer.rounds == rounds + 1, "one round: the events and the step together"
        assert not (tmp_path / "runs.db").exists()
        with sqlite3.connect(tmp_path / "durable.db") as db:
            assert db.execute("SELECT last_seq FROM runs WHERE run_id = 'run_j'").fetchone() == (5,)
            assert db.execute("SELECT seq FROM run_steps WHERE run_id = 'run_j'").fetchall() == [(5,)]

        real = store.write_in

        def failing(db: sqlite3.Connection, batch: Any) -> None:
            raise sqlite3.OperationalError("disk I/O error")

        store.write_in = failing  # type: ignore[method-assign]
        run.append(ev.TextDelta(text="lost with the step", turn=2))
        step = Step(run_id="run_j", step_no=2, kind="turn", key="turn:2", value={"v": 2}, seq=len(run.log))
        with pytest.raises(sqlite3.OperationalError):
            await store.put(step)
        with sqlite3.connect(tmp_path / "durable.db") as db:
            assert db.execute("SELECT last_seq FROM runs WHERE run_id = 'run_j'").fetchone() == (5,)
        store.write_in = real  # type: ignore[method-assign]
        await asyncio.wait_for(store.put(step), 5)  # the caller's retry; the round's events come with it
        with sqlite3.connect(tmp_path / "durable.db") as db:
            assert db.execute("SELECT last_seq FROM runs WHERE run_id = 'run_j'").fetchone() == (6,)
    finally:
        await log.close()
        await store.aclose()


async def test_a_runs_db_of_an_earlier_version_is_copied_into_the_joined_file(tmp_path: Path) -> None:
    earlier = SqliteRunLog(tmp_path / "runs.db", retention_s=60, max_run_s=600)
    run = earlier.new_run(spec("run_e", durable=True), RunControl(), caller="alice", key="", fingerprint="")
    run.append(ev.TextDelta(text="kept", turn=1))
    await earlier.flush(run)
    await earlier.close()
    store, log = await joined(tmp_path)
    try:
        found = await log.history("run_e")
        assert found is not None and [e.seq for e in found[1]] == [1]
        assert not (tmp_path / "runs.db").exists() and (tmp_path / "runs.db.copied").exists()
    finally:
        await log.close()
        await store.aclose()


async def test_a_lagging_durable_streams_merged_deltas_wait_for_the_file(tmp_path: Path) -> None:
    """Past the file a stream sends single events only (a caller drops a replaced one seq by seq): a stretch merged
    for a reader that lags is sent once the file holds it."""
    log, gate = held_log(tmp_path)
    run = log.new_run(spec("run_m", durable=True), RunControl(), caller="alice", key="", fingerprint="")
    for i in range(10):
        run.append(ev.TextDelta(text=f"t{i}", turn=1))
    stream = aiter(run.follow(0, coalesce_lag=2))
    try:
        merged = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.05)
        assert not merged.done()
        gate.set()
        entry = await asyncio.wait_for(merged, 5)
        assert (entry.first_seq, entry.seq) == (1, 10)
    finally:
        gate.set()
        await stream.aclose()
        await log.close()


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
