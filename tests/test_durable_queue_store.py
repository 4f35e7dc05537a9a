"""The durable queue in the checkpoint stores (`DurableQueue`; PostgreSQL for a fleet, SQLite for one node): oldest
first, each run claimed by one process however many claim at once (FOR UPDATE SKIP LOCKED), a fleet-wide bound on
what waits and an optional cap on what runs, queue positions the same from every process, a queued run cancelled
before anyone claims it, and an enqueue announced to the peers (NOTIFY)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from service.durable.base import DurableQueue, DurableRun
from service.durable.postgres import PgCheckpointStore
from service.durable.sqlite import SqliteCheckpointStore


async def _opened(make: Callable[[str], Any]) -> AsyncIterator[Callable[[str], Any]]:
    opened: list[Any] = []

    async def open_(owner: str) -> Any:
        store = make(owner)
        await store.open()
        opened.append(store)
        return store

    yield open_
    for store in reversed(opened):
        await store.aclose()


@pytest.fixture
async def stores(postgres_schema: Any) -> AsyncIterator[Callable[[str], Any]]:
    """PostgreSQL stores of several processes."""
    async for make in _opened(lambda owner: PgCheckpointStore(postgres_schema.url, owner, recover_interval_s=60)):
        yield make


@pytest.fixture(params=["postgres", "sqlite"])
async def either(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Callable[[str], Any]]:
    """Stores of either kind; SQLite's share one file (one node: two owners stand for two lives of one process)."""
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_schema").url
        make: Callable[[str], Any] = lambda owner: PgCheckpointStore(url, owner, recover_interval_s=60)  # noqa: E731
    else:
        make = lambda owner: SqliteCheckpointStore(tmp_path / "durable.db", owner, recover_interval_s=60)  # noqa: E731
    async for open_ in _opened(make):
        yield open_


def queued(run_id: str) -> DurableRun:
    return DurableRun(run_id=run_id, caller="c", owner="", state="queued", request={"run_id": run_id}, background=True)


async def test_claims_are_oldest_first_and_positions_follow(either: Any) -> None:
    a, b = await either("a"), await either("b")
    assert isinstance(a, DurableQueue)
    for i in range(5):
        assert await a.enqueue(queued(f"r{i}"), limit=100)
    assert [await b.queue_position(f"r{i}") for i in range(5)] == [1, 2, 3, 4, 5]
    first = await b.claim_queued(2)
    assert [r.run_id for r in first] == ["r0", "r1"]
    assert all(r.owner == "b" and r.state == "running" and r.request == {"run_id": r.run_id} for r in first)
    assert [await a.queue_position(f"r{i}") for i in range(5)] == [0, 0, 1, 2, 3]
    assert [r.run_id for r in await a.claim_queued(10)] == ["r2", "r3", "r4"]
    assert await a.queued() == 0 and await a.claim_queued(1) == []
    loaded = await a.load("r0")
    assert loaded is not None and loaded.owner == "b" and loaded.state == "running"


async def test_concurrent_claimers_never_claim_one_run_twice(stores: Any) -> None:
    claimers = [await stores(f"p{i}") for i in range(4)]
    for i in range(40):
        assert await claimers[0].enqueue(queued(f"r{i:02}"), limit=100)

    async def claim_all(store: PgCheckpointStore) -> list[str]:
        got: list[str] = []
        while batch := await store.claim_queued(3):
            got += [r.run_id for r in batch]
        return got

    claimed = await asyncio.gather(*(claim_all(s) for s in claimers))
    every = [run_id for got in claimed for run_id in got]
    assert sorted(every) == [f"r{i:02}" for i in range(40)]  # each exactly once
    assert sum(1 for got in claimed if got) >= 2  # and the claimers did share the work


async def test_the_fleet_wide_bounds(either: Any) -> None:
    a, b = await either("a"), await either("b")
    assert await a.enqueue(queued("r1"), limit=2) and await b.enqueue(queued("r2"), limit=2)
    assert not await a.enqueue(queued("r3"), limit=2)  # full: nothing written
    assert await a.load("r3") is None
    # the running cap counts the fleet's running background runs
    assert [r.run_id for r in await a.claim_queued(5, max_running=1)] == ["r1"]
    assert await b.claim_queued(5, max_running=1) == []
    assert [r.run_id for r in await b.claim_queued(5, max_running=2)] == ["r2"]


async def test_a_queued_run_is_cancelled_once_and_never_claimed(either: Any) -> None:
    a, b = await either("a"), await either("b")
    for run_id in ("r1", "r2"):
        await a.enqueue(queued(run_id), limit=10)
    assert await b.cancel_queued("r1")
    assert not await a.cancel_queued("r1")  # not queued any more
    assert (await a.load("r1")).state == "cancelled"  # type: ignore[union-attr]
    assert await a.queue_position("r2") == 1
    assert [r.run_id for r in await a.claim_queued(5)] == ["r2"]
    assert not await b.cancel_queued("r2")  # claimed: cancelled as a running run, not here


async def test_an_enqueue_wakes_the_peers(stores: Any) -> None:
    a, b = await stores("a"), await stores("b")
    recovering = asyncio.create_task(b.recover(_nothing))  # b's listener runs with its recovery
    try:
        await asyncio.wait_for(b.listening.wait(), 10)
        b.queue_wake.clear()
        await a.enqueue(queued("r1"), limit=10)
        await asyncio.wait_for(b.queue_wake.wait(), 5)
    finally:
        recovering.cancel()
        await asyncio.gather(recovering, return_exceptions=True)


async def _nothing(run: DurableRun) -> None:
    raise AssertionError(f"nothing to recover, got {run.run_id}")
