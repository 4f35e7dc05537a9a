"""A run taken over from a dead replica on the real Redis: a CancelRun sent while nobody drove it, or racing the
takeover, stops it on the process that revived it (outside findings: the cancel was answered OK and lost)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from backends import RedisNamespace
from test_shared_runs import GATED, replicas

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.control import RunControl
from service.errors import RunCancelled
from service.loop import RunSpec
from service.run import Run
from service.state import redis_runs


async def dead_owners_run(ns: RedisNamespace, run_id: str, **fields: Any) -> None:
    """The record a replica killed while driving `run_id` left behind."""
    record = {"caller": "anonymous", "state": "running", "owner": "dead", "created_ns": 1, **fields}
    client = aioredis.Redis.from_url(ns.url)
    try:
        await client.hset(f"{ns.prefix}run:{run_id}", mapping=record)
    finally:
        await client.aclose()


def spec_of(run_id: str) -> RunSpec:
    return RunSpec(run_id=run_id, message="go", model="m", system=None, max_turns=5, max_tokens=100, tools=())


@pytest.mark.parametrize(("mode", "after_turn"), [(b"now", False), (b"after_turn", True)])
async def test_a_cancel_sent_while_nobody_drove_the_run_stops_it_when_revived(
    start_service: Any, tmp_path: Path, redis_ns: RedisNamespace, mode: bytes, after_turn: bool
) -> None:
    """An outside finding: CancelRun between the driver's death and a peer's takeover was answered OK (its mark on
    the record, its message to the dead owner's channel), and the peer went on with the run, calling tools. The
    process that revives the run reads the mark and stops it as asked."""
    ((svc,), _) = await replicas(start_service, tmp_path, redis_ns, GATED, n=1)
    store = svc.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    run_id = "run_cancelledwhileaway"
    await dead_owners_run(redis_ns, run_id, cancel_requested=mode)
    control = RunControl()
    run = await store.revive(spec_of(run_id), control, caller="anonymous")
    assert isinstance(run, Run) and control.stopping
    reason = control.after_turn_reason() if after_turn else control.stop_reason()
    assert isinstance(reason, RunCancelled) and reason.message.startswith("cancelled by CancelRun")
    store.settled(run)


async def test_a_cancel_racing_the_takeover_reaches_the_new_owner(
    start_service: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """An outside finding: a CancelRun whose caller read the record before a peer revived the run, and marked it
    after the peer had read the mark, went to the dead owner's channel only; the peer went on with the run. The
    takeover names the new owner in the record as it reads it, and a cancel tells the owner the record names when it
    marks it."""
    ((svc,), _) = await replicas(start_service, tmp_path, redis_ns, GATED, n=1)
    store = svc.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    run_id = "run_cancelracingtakeover"
    await dead_owners_run(redis_ns, run_id)
    read_before = await store.record(run_id)  # the canceller's read: the dead owner
    assert read_before is not None and read_before.owner == "dead"
    control = RunControl()
    run = await store.revive(spec_of(run_id), control, caller="anonymous")
    assert isinstance(run, Run) and not control.stopping  # no mark yet
    now = await store.record(run_id)
    assert now is not None and now.owner == store.instance
    heard: asyncio.Queue[tuple[str, bool]] = asyncio.Queue()
    store.on_cancel(lambda run_id, after_turn: heard.put_nowait((run_id, after_turn)))  # the run is not registered
    await store.cancel(read_before, after_turn=True, wait_s=0)
    assert await asyncio.wait_for(heard.get(), 5) == (run_id, True)
    store.settled(run)


async def test_a_cancel_of_a_run_driven_here_is_kept_on_its_record_for_a_reviver(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """An outside finding (one node, the same on a fleet): an acknowledged CancelRun AFTER_TURN lived only in the
    driving process's memory; killed before the turn ended, the run went on to its end where it was revived. The
    cancel is kept on the run's Redis record, which `revive` reads; an IMMEDIATE one is never downgraded."""
    ((svc,), opened) = await replicas(start_service, tmp_path, redis_ns, GATED, n=1)
    api = stub(channel_to(svc))
    run_id = (await api.SubmitRun(pb.RunAgentRequest(message="go", durability=pb.RunAgentRequest.DURABLE))).run_id
    store = svc.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    await store.shipper.flushed(5)  # its record is in Redis
    client = aioredis.Redis.from_url(redis_ns.url)
    try:
        marks = []
        for mode in (pb.CancelRunRequest.AFTER_TURN, pb.CancelRunRequest.IMMEDIATE, pb.CancelRunRequest.AFTER_TURN):
            if mode == pb.CancelRunRequest.AFTER_TURN or not marks:
                await api.CancelRun(pb.CancelRunRequest(run_id=run_id, mode=mode))
            else:  # IMMEDIATE ends the run: mark it as the registry does, without waiting for the end
                await store.mark_cancel(run_id, after_turn=False)
            marks.append(await client.hget(f"{redis_ns.prefix}run:{run_id}", "cancel_requested"))
        assert marks == [b"after_turn", b"now", b"now"]
        record = await store.record(run_id)  # a cancel relayed from another replica does not downgrade it either
        assert record is not None
        await store.remote.cancel(record, after_turn=True, wait_s=0)
        assert await client.hget(f"{redis_ns.prefix}run:{run_id}", "cancel_requested") == b"now"
    finally:
        await client.aclose()
        opened.set()
