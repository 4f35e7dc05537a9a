"""Ended durable runs' checkpoints are deleted after `durable.keep_ended_s` on the real SQLite file and the real
PostgreSQL: ended runs (finished, or cancelled while queued) with their steps go, running and queued runs and those
ended since the cut-off stay, and `recover`'s loop prunes on its own. Without it durable.db grew ~10 KB a run for
good (a soak: 187 MB in 36 minutes)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.config import Config
from service.durable import batching
from service.durable.base import DurableRun, Step
from service.durable.postgres import PgCheckpointStore
from service.durable.sqlite import SqliteCheckpointStore
from service.wiring import build_checkpoints


@pytest.fixture(params=["sqlite", "postgres"])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[..., Any]:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_schema").url
        return lambda owner, **kw: PgCheckpointStore(url, owner, **kw)
    return lambda owner, **kw: SqliteCheckpointStore(tmp_path / "durable.db", owner, **kw)


def durable(run_id: str) -> DurableRun:
    return DurableRun(run_id=run_id, caller="alice", owner="", state="running", request={"prompt": run_id})


async def started(store: Any, run_id: str, steps: int = 2) -> None:
    await store.begin(durable(run_id))
    for n in range(1, steps + 1):
        await store.put(Step(run_id=run_id, step_no=n, kind="turn", key=f"turn:{n}", value={"n": n}, seq=n))


async def test_prune_deletes_only_runs_ended_before_the_cut_off(make: Callable[..., Any], opened: Any) -> None:
    store = await opened(make("a"))
    for run_id in ("done", "failed", "running", "late"):
        await started(store, run_id)
    await store.end("done", "succeeded")
    await store.end("failed", "failed")
    assert await store.enqueue(durable("queued"), limit=10)
    assert await store.enqueue(durable("dropped"), limit=10)
    assert await store.cancel_queued("dropped")  # ended without ever running: no steps, a row all the same
    cut_off = time.time() + 1.0  # everything ended so far is older than this
    assert await store.prune(cut_off) == 3
    for run_id in ("done", "failed", "dropped"):
        assert await store.load(run_id) is None, run_id
    kept = {run_id: await store.load(run_id) for run_id in ("running", "late", "queued")}
    assert {r: (k.state if k else None) for r, k in kept.items()} == {
        "running": "running",
        "late": "running",
        "queued": "queued",
    }
    assert [s.step_no for s in kept["running"].steps] == [1, 2]  # type: ignore[union-attr]
    between = time.time()
    await store.end("late", "cancelled")
    assert await store.prune(time.time() - 3600.0) == 0  # ended just now: kept for keep_ended_s
    assert await store.prune(between) == 0  # "late" ended after this cut-off
    assert (await store.load("late")) is not None
    assert await store.prune(time.time() + 1.0) == 1
    # a pruned run's steps are gone with it: the same id begun again starts with none
    await store.begin(durable("done"))
    fresh = await store.load("done")
    assert fresh is not None and fresh.state == "running" and fresh.steps == []


async def test_prune_takes_a_batch_at_a_time(
    make: Callable[..., Any], opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await opened(make("a"))
    for i in range(5):
        await started(store, f"r{i}", steps=1)
        await store.end(f"r{i}", "succeeded")
    monkeypatch.setattr("service.durable.sqlite.PRUNE_BATCH", 2)
    monkeypatch.setattr("service.durable.postgres.PRUNE_BATCH", 2)
    later = time.time() + 1.0
    assert [await store.prune(later) for _ in range(4)] == [2, 2, 1, 0]


async def test_recover_prunes_ended_runs_on_its_own(make: Callable[..., Any], opened: Any) -> None:
    store = await opened(make("a", keep_ended_s=1e-6, recover_interval_s=0.05))
    await started(store, "ended")
    await started(store, "going")
    await store.end("ended", "succeeded")

    async def resume(run: DurableRun) -> None:
        raise AssertionError(f"nothing to resume here, got {run.run_id}")

    pruned = asyncio.Event()
    real = store.prune

    async def prune(before: float) -> int:
        deleted = int(await real(before))
        pruned.set()
        return deleted

    store.prune = prune
    task = asyncio.create_task(store.recover(resume))
    try:
        await asyncio.wait_for(pruned.wait(), 10)
        assert await store.load("ended") is None
        going = await store.load("going")
        assert going is not None and going.state == "running"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest.mark.parametrize("keep_ended_s", [None, 60.0])
async def test_prunes_at_most_once_a_minute_and_never_with_null(tmp_path: Path, keep_ended_s: float | None) -> None:
    store = SqliteCheckpointStore(tmp_path / "durable.db", "a", keep_ended_s=keep_ended_s)
    cut_offs: list[float] = []

    async def prune(before: float) -> int:
        cut_offs.append(before)
        return 0

    store.prune = prune  # type: ignore[method-assign]
    await store._prune_now_and_then()
    await store._prune_now_and_then()  # within the minute: not again
    if keep_ended_s is None:
        assert cut_offs == []
    else:
        assert len(cut_offs) == 1 and abs(cut_offs[0] - (time.time() - keep_ended_s)) < 5
        store._pruned_at -= batching.PRUNE_EVERY_S
        await store._prune_now_and_then()
        assert len(cut_offs) == 2


def test_the_composition_root_passes_keep_ended_s(tmp_path: Path) -> None:
    assert batching.PRUNE_EVERY_S == 60.0
    config = Config.model_validate({"data_dir": str(tmp_path), "durable": {"keep_ended_s": 120}})
    assert build_checkpoints(config).keep_ended_s == 120  # type: ignore[attr-defined]
    default = Config.model_validate({"data_dir": str(tmp_path)})
    assert build_checkpoints(default).keep_ended_s == 3600.0  # type: ignore[attr-defined]
    kept = Config.model_validate({"data_dir": str(tmp_path), "durable": {"keep_ended_s": None}})
    assert build_checkpoints(kept).keep_ended_s is None  # type: ignore[attr-defined]


async def test_one_look_catches_up_a_backlog_a_batch_at_a_time(
    make: Callable[..., Any], opened: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process ending more runs a minute than one batch holds would never catch up at a batch a look."""
    store = await opened(make("a", keep_ended_s=1e-6))
    for i in range(5):
        await started(store, f"r{i}", steps=1)
        await store.end(f"r{i}", "succeeded")
    monkeypatch.setattr(batching, "PRUNE_BATCH", 2)
    monkeypatch.setattr("service.durable.sqlite.PRUNE_BATCH", 2)
    monkeypatch.setattr("service.durable.postgres.PRUNE_BATCH", 2)
    await store._prune_now_and_then()  # one look
    assert [await store.load(f"r{i}") for i in range(5)] == [None] * 5
