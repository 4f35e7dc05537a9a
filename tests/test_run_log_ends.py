"""The embedded run log's record of a run whose row was written before the run ended, the process killed before
the next round: the record ends as its kept closing event says."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from test_run_log import finished, registry

from service import events as ev


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
