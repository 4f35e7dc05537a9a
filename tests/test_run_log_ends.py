"""The embedded run log's record of a run whose row was written before the run ended, the process killed before
the next round: the record ends as its kept closing event says."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

from test_run_log import Clock, finished, registry

from service import events as ev
from service.state.sqlite_runs import SWEEP_S


async def test_a_run_whose_closing_event_is_kept_reads_ended_whatever_its_row_says(tmp_path: Path) -> None:
    """An outside finding (one node): a queued run cancelled just before a kill -9 read QUEUED for good (GetRun,
    CancelRun said to retry), its log ending with its cancellation."""
    path = tmp_path / "runs.db"
    reg = registry(path)
    events = await finished(reg, "run_cut", durable=True)
    await reg.close()
    with sqlite3.connect(path) as db:  # the row of the round before the end, as a kill -9 leaves it
        db.execute("UPDATE runs SET state = 'queued', ended_ns = 0 WHERE run_id = 'run_cut'")
    after = registry(path)
    try:
        record = await after.record("run_cut", "alice")
        assert (record.state, record.last_seq) == ("succeeded", len(events))
        assert isinstance(record.outcome, ev.FinalResponse) and record.ended_ns > 0
    finally:
        await after.close()


async def test_an_idle_log_deletes_what_has_expired(tmp_path: Path) -> None:
    """An outside finding: expired runs' rows were deleted only inside a write round, so an idle server kept them on
    disk (60,563 events rows 161 s after they expired)."""
    path, clock = tmp_path / "runs.db", Clock()
    reg = registry(path, clock=clock, retention_s=60)
    try:
        assert reg.runlog is not None
        reg.runlog.writer.idle_round_s = 0.02
        await finished(reg, "run_old", durable=True)
        await reg.runlog.writer.flush(reg.runs["run_old"])
        clock.now += 61 + SWEEP_S  # expired, and a sweep is due
        for _ in range(250):  # a few idle rounds, with no run noted
            await asyncio.sleep(0.02)
            with sqlite3.connect(path) as db:
                left = db.execute("SELECT (SELECT count(*) FROM runs) + (SELECT count(*) FROM events)").fetchone()[0]
            if left == 0:
                break
        assert left == 0
    finally:
        await reg.close()
