"""Runs shared through a Redis of the test's own (it is paused, and its clients counted, which the shared one must not
be): a run that needs no admission starts without waiting on Redis, another replica asked about it before its record
lands waits for it, and the runs watched on a replica share one blocking connection."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
import test_state_outage
from backends import RedisNamespace
from test_shared_runs import GATED, covered, read_until, replicas
from test_state_outage import OwnRedis, eventually

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.config import StateConfig
from service.state.redis_runs import RedisRunStore

own_redis = test_state_outage.own_redis  # the fixture: a redis-server of this test's own


async def test_a_run_without_key_or_quota_streams_while_redis_is_paused_and_b_waits_for_its_record(
    start_service: Any, channel_to: Any, tmp_path: Path, own_redis: OwnRedis
) -> None:
    ns = RedisNamespace(own_redis.url, "admit:")
    (a, b), opened = await replicas(start_service, tmp_path, ns, GATED)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    store_b = b.registry.store
    assert isinstance(store_b, RedisRunStore)
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        await admin.execute_command("CLIENT", "PAUSE", 20_000, "WRITE")  # reads go on, writes wait
        call = on_a.RunAgent(pb.RunAgentRequest(message="go"))
        async with asyncio.timeout(2):  # with an admission round trip first, it would wait for the pause
            first = await call.read()
        assert first.HasField("run_started") and first.seq == 1
        run_id = first.run_id
        asked = asyncio.ensure_future(on_b.GetRun(pb.GetRunRequest(run_id=run_id)))
        # B found no record (A's first shipment waits behind the pause) and waits for the run's stream instead
        await eventually(lambda: f"admit:run:{run_id}:events" in store_b.watch.follows, within_s=5)
        assert not asked.done()
        await admin.execute_command("CLIENT", "UNPAUSE")
        got = await asked
        assert got.run_id == run_id and got.state == pb.Run.RUNNING and got.last_seq >= 1
        opened.set()
        seen = [first]
        while (event := await call.read()) is not grpc.aio.EOF:
            seen.append(event)
        assert covered(seen) == list(range(1, len(a.registry.get(run_id).log) + 1))
        await a.registry.store.shipper.flushed(5)  # type: ignore[union-attr]
        got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
        assert got.state == pb.Run.SUCCEEDED and got.last_seq == len(a.registry.get(run_id).log)
    finally:
        await admin.execute_command("CLIENT", "UNPAUSE")
        await admin.aclose()


async def test_an_unknown_run_is_not_found_after_the_record_wait(
    start_service: Any, channel_to: Any, tmp_path: Path, own_redis: OwnRedis
) -> None:
    ns = RedisNamespace(own_redis.url, "admit:")
    (b,), _ = await replicas(start_service, tmp_path, ns, GATED, n=1, state_options={"record_wait_s": 0.2})
    loop = asyncio.get_running_loop()
    began = loop.time()
    try:
        await stub(channel_to(b)).GetRun(pb.GetRunRequest(run_id="run_nope"))
    except grpc.aio.AioRpcError as exc:
        assert exc.code() == grpc.StatusCode.NOT_FOUND
    else:
        raise AssertionError("an unknown run was found")
    assert 0.2 <= loop.time() - began < 5
    assert not b.registry.store.watch.follows  # type: ignore[union-attr]  # the wait is let go


RUNS = {"background_max_concurrent": 16}  # the 12 runs at once


async def blocked_clients(admin: aioredis.Redis) -> int:
    return sum("b" in client["flags"] for client in await admin.client_list())


async def test_the_runs_watched_on_b_share_one_blocking_connection(
    start_service: Any, channel_to: Any, tmp_path: Path, own_redis: OwnRedis
) -> None:
    ns = RedisNamespace(own_redis.url, "watch:")
    # a long block: a watcher that joined only when the reader's XREAD timed out would fail the timeout below
    (a, b), opened = await replicas(start_service, tmp_path, ns, GATED, state_options={"read_block_s": 30}, runs=RUNS)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    run_ids = [(await on_a.SubmitRun(pb.RunAgentRequest(message=f"go {i}"))).run_id for i in range(12)]
    watches = [on_b.WatchRun(pb.WatchRunRequest(run_id=run_id)) for run_id in run_ids]
    seen: list[list[pb.AgentEvent]] = [[] for _ in run_ids]
    async with asyncio.timeout(20):
        for watch, events in zip(watches, seen, strict=True):  # each joins the reader in flight, one after another
            await read_until(watch, "tool_call_ready", events)
    admin = aioredis.Redis.from_url(own_redis.url)
    try:
        assert await blocked_clients(admin) == 1  # one XREAD for the 12 runs (it was one connection a run)
        assert len(b.registry.store.watch.follows) == len(run_ids)  # type: ignore[union-attr]
        opened.set()
        async with asyncio.timeout(20):
            for watch, events in zip(watches, seen, strict=True):
                events += [e async for e in watch]
        for run_id, events in zip(run_ids, seen, strict=True):
            assert events[-1].HasField("final_response")
            assert covered(events) == list(range(1, len(a.registry.get(run_id).log) + 1))
        await eventually(lambda: not b.registry.store.watch.follows)  # type: ignore[union-attr]
    finally:
        await admin.aclose()


def test_a_probe_slower_than_a_third_of_the_lease_is_refused() -> None:
    assert StateConfig(lease_s=3, probe_s=1).probe_s == 1
    with pytest.raises(ValueError, match="more than a third of state.lease_s"):
        StateConfig(lease_s=3, probe_s=1.5)
