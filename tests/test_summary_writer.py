"""Ended runs' summaries, written behind their ends in batches (`service/records/summaries.py`, `SummaryWriter`): a
burst of ends is one write, not a task and a write per run, and nothing added is lost to a close or a failed batch."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from service import events as ev
from service.control import RunControl
from service.records.summaries import RunSummary, SqliteRunSummaryStore, SummaryWriter
from service.run import Run
from service.spec import RunSpec


def ended(run_id: str) -> Run:
    spec = RunSpec(run_id=run_id, message="hi", model="m", system=None, max_turns=1, max_tokens=10, tools=())
    run = Run(spec, RunControl(), caller="alice", key="", fingerprint="")
    run.append(
        ev.FinalResponse(
            text="done", stop_reason="end_turn", turns=1, tool_calls=0, input_tokens=1, output_tokens=1, duration_s=0.1
        )
    )
    run.finish()
    return run


class Counting:
    """A summary store that keeps what it is given and counts the writes; `fail` writes raise."""

    def __init__(self, fail: int = 0) -> None:
        self.kept: dict[str, RunSummary] = {}
        self.writes: list[int] = []
        self.fail = fail

    async def put_many(self, summaries: Sequence[RunSummary]) -> None:
        self.writes.append(len(summaries))
        await asyncio.sleep(0)  # a write waits on its database
        if self.fail:
            self.fail -= 1
            raise OSError("the database is away")
        for s in summaries:
            self.kept.setdefault(s.run_id, s)


async def test_a_burst_of_ends_is_written_in_one_write_and_every_summary_kept() -> None:
    store = Counting()
    writer = SummaryWriter(lambda: store)  # type: ignore[arg-type, return-value]
    for i in range(50):
        writer.add(ended(f"run_{i}"))
    await writer.flushed()
    assert store.writes == [50]
    assert sorted(store.kept) == sorted(f"run_{i}" for i in range(50))
    assert store.kept["run_7"].state == "succeeded" and store.kept["run_7"].last_seq == 1


async def test_ends_during_a_write_go_in_the_next_batch_and_a_batch_is_bounded() -> None:
    store = Counting()
    writer = SummaryWriter(lambda: store)  # type: ignore[arg-type, return-value]
    writer.BATCH = 3
    for i in range(4):
        writer.add(ended(f"run_{i}"))
    await asyncio.sleep(0)  # the writer takes its first batch and waits on the write
    writer.add(ended("run_late"))
    await writer.flushed()
    assert store.writes == [3, 2]
    assert len(store.kept) == 5


async def test_a_failed_batch_is_logged_and_the_next_one_written(caplog: pytest.LogCaptureFixture) -> None:
    store = Counting(fail=1)
    writer = SummaryWriter(lambda: store)  # type: ignore[arg-type, return-value]
    writer.add(ended("run_lost"))
    with caplog.at_level(logging.ERROR):
        await writer.flushed()
    assert any(r.getMessage() == "run summaries not written" and r.run_ids == ["run_lost"] for r in caplog.records)  # type: ignore[attr-defined]
    writer.add(ended("run_kept"))
    await writer.flushed()
    assert list(store.kept) == ["run_kept"]


async def test_sqlite_keeps_a_batch_in_one_transaction(tmp_path: Path) -> None:
    store = SqliteRunSummaryStore(tmp_path / "summaries.db")
    writer = SummaryWriter(lambda: store)
    try:
        for i in range(20):
            writer.add(ended(f"run_{i}"))
        writer.add(ended("run_3"))  # a handed-over run may end twice: the first summary stays
        await writer.flushed()
        got: Any = await store.get("run_3")
        assert got is not None and got.state == "succeeded"
        assert all([await store.get(f"run_{i}") for i in range(20)])
    finally:
        await store.aclose()


async def test_the_registry_writes_every_summary_before_it_closes(start_service: Any) -> None:
    svc = await start_service(runs={"keep_summaries": True})
    store = Counting()
    svc.registry.summaries = store
    runs = [svc.registry.start(ended(f"run_{i}").spec, caller="alice")[0] for i in range(10)]
    await asyncio.gather(*(run.ended() for run in runs))
    await svc.registry.close()  # as the service's stop does, right after the runs' ends
    assert sorted(store.kept) == sorted(run.id for run in runs)
    assert sum(store.writes) == 10 and len(store.writes) < 10
