"""SubmitRun on the fleet's durable queue, with real server processes on the real PostgreSQL and Redis: two servers
with one background slot each; runs submitted on one wait in the queue (GetRun on the other shows their positions),
are spread over both, survive the `kill -9` of the process that claimed them, and a queued one is cancelled from the
other replica without ever starting. On one node (SQLite, the process's own queue), queued runs survive `kill -9` and
a restart, then run."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import psycopg
import pytest
from backends import PostgresSchema, RedisNamespace, audit_key_file
from test_durable_process import Fleet

from agent.v1 import agent_pb2 as pb
from conftest import stub
from fake_anthropic import FakeAnthropic

ONE_SLOT = {"background_max_concurrent": 1}
DURABLE = {"recover_interval_s": 0.5, "queue_poll_s": 0.5}


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    """Any number of runs, in any order: each asks for one held `effect_safe` call, then ends with "done"."""

    def reply(body: dict[str, Any]) -> None:
        content = body["messages"][-1]["content"]
        answered = isinstance(content, list) and any(block.get("type") == "tool_result" for block in content)
        if answered:
            server.script_turn("done")
        else:
            server.script_turn("Working.", tool_uses=[("effect_safe", {"text": "x"})])

    async with FakeAnthropic(on_request=reply) as server:
        yield server


@pytest.fixture
async def make_fleet(
    tmp_path: Path, fake: FakeAnthropic, redis_ns: RedisNamespace, postgres_schema: PostgresSchema
) -> AsyncIterator[Callable[..., Fleet]]:
    fleets: list[Fleet] = []

    def make(**durable: Any) -> Fleet:
        fleet = Fleet(
            tmp_path,
            fake,
            # a short lease: a watcher of a queued run (no process holds it) must not take it for a dead one's
            state={"url": redis_ns.url, "prefix": redis_ns.prefix, "lease_s": 1, "probe_s": 0.3, "read_block_s": 0.5},
            records={"url": postgres_schema.url},
            audit={"key_file": str(audit_key_file(tmp_path))},  # one audit chain in PostgreSQL: one key for both
            runs=ONE_SLOT,
            durable={**DURABLE, **durable},
        )
        fleets.append(fleet)
        return fleet

    yield make
    for fleet in fleets:
        await fleet.stop()


async def submit(port: int, n: int, *, fleet: bool = True) -> list[str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ids = []
        for _ in range(n):
            answer = await stub(channel).SubmitRun(pb.RunAgentRequest(message="go"), timeout=10)
            assert answer.state == pb.Run.QUEUED or not fleet  # on the fleet's queue, every run waits first
            ids.append(answer.run_id)
        return ids


async def get(port: int, run_ids: list[str]) -> list[pb.Run]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [await stub(channel).GetRun(pb.GetRunRequest(run_id=r), timeout=10) for r in run_ids]


async def until_ended(port: int, run_ids: list[str], within_s: float = 30) -> list[pb.Run]:
    ended = (pb.Run.SUCCEEDED, pb.Run.FAILED, pb.Run.CANCELLED)
    async with asyncio.timeout(within_s):
        while True:
            runs = await get(port, run_ids)
            if all(r.state in ended for r in runs):
                return runs
            await asyncio.sleep(0.1)


async def started(fleet: Fleet, n: int) -> None:
    """Until `n` runs have made their (held) tool call."""
    async with asyncio.timeout(20):
        while len(fleet.executions("effect_safe")) < n:  # noqa: ASYNC110 (other processes)
            await asyncio.sleep(0.02)


def runs_started(fleet: Fleet) -> set[str]:
    return {key.partition(":")[0] for key in fleet.executions("effect_safe")}


def owners(postgres_schema: PostgresSchema) -> dict[str, str]:
    with psycopg.connect(postgres_schema.url) as conn:
        return dict(conn.execute("SELECT run_id, owner FROM durable_runs").fetchall())  # type: ignore[arg-type]


async def watch(port: int, run_id: str) -> list[pb.AgentEvent]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30)]


async def test_runs_queue_fleet_wide_show_positions_spread_and_cancel(
    make_fleet: Callable[..., Fleet], postgres_schema: PostgresSchema
) -> None:
    fleet = make_fleet(queue_max=2)
    fleet.hold()
    _, port_a = await fleet.start("a")
    _, port_b = await fleet.start("b")
    ids = await submit(port_a, 2)
    await started(fleet, 2)  # one slot on each process: one run on each
    ids += await submit(port_a, 2)  # then two wait
    await asyncio.sleep(0.3)  # a third claim would have happened by now (each wake-up claims at once)
    assert runs_started(fleet) == set(ids[:2])
    with pytest.raises(grpc.aio.AioRpcError) as full:  # two wait: the fleet's queue is full, from either replica
        await submit(port_b, 1)
    assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    seen = await get(port_b, ids)
    assert [r.state for r in seen] == [pb.Run.RUNNING, pb.Run.RUNNING, pb.Run.QUEUED, pb.Run.QUEUED]
    assert [r.queue_position for r in seen] == [0, 0, 1, 2]
    cancelled = await stub(grpc.aio.insecure_channel(f"127.0.0.1:{port_b}")).CancelRun(
        pb.CancelRunRequest(run_id=ids[2]), timeout=10
    )
    assert cancelled.state == pb.Run.CANCELLED
    after = await get(port_a, ids[2:])
    assert [(r.state, r.queue_position) for r in after] == [(pb.Run.CANCELLED, 0), (pb.Run.QUEUED, 1)]
    watcher = asyncio.create_task(watch(port_b, ids[3]))  # from the replica that did not take it, while queued
    await asyncio.sleep(2)  # past the lease the submitting replica took for it (real time, in the servers)
    assert not watcher.done()
    fleet.release()
    final = await until_ended(port_b, ids)
    assert [r.state for r in final] == [pb.Run.SUCCEEDED, pb.Run.SUCCEEDED, pb.Run.CANCELLED, pb.Run.SUCCEEDED]
    watched = await asyncio.wait_for(watcher, 30)
    assert watched[0].HasField("run_started") and watched[-1].final_response.text == "done"
    assert ids[2] not in runs_started(fleet)  # never started: no tool call, no model request
    assert len(fleet.fake.requests) == 6
    log: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as ended:  # a stream of a cancelled run ends CANCELLED, after its log
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as channel:
            async for event in stub(channel).WatchRun(pb.WatchRunRequest(run_id=ids[2]), timeout=30):
                log.append(event)
    assert ended.value.code() == grpc.StatusCode.CANCELLED
    assert [e.WhichOneof("event") for e in log] == ["run_started", "error"]  # RunFailed on the wire
    ran = owners(postgres_schema)
    assert len({ran[r] for r in ids if r != ids[2]}) == 2  # both processes drove runs
    for run_id in (ids[0], ids[3]):  # one log from start to end, no recovery in it, gapless
        events = await watch(port_a, run_id)
        assert events[0].HasField("run_started") and events[-1].final_response.text == "done"
        assert not any(e.HasField("run_recovered") for e in events)
        assert [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)] == list(range(1, events[-1].seq + 1))


async def test_kill_9_of_the_process_holding_a_claimed_run_the_peer_finishes_it(
    make_fleet: Callable[..., Fleet],
) -> None:
    fleet = make_fleet()
    fleet.hold()
    proc_a, port_a = await fleet.start("a")
    _, port_b = await fleet.start("b")
    ids = await submit(port_a, 3)
    await started(fleet, 2)
    await asyncio.sleep(0.3)
    runs = await get(port_b, ids)
    assert [r.state for r in runs] == [pb.Run.RUNNING, pb.Run.RUNNING, pb.Run.QUEUED]
    proc_a.send_signal(signal.SIGKILL)  # it holds one of the two running runs
    await proc_a.wait()
    fleet.release()
    final = await until_ended(port_b, ids)
    assert [r.state for r in final] == [pb.Run.SUCCEEDED] * 3
    logs = [await watch(port_b, run_id) for run_id in ids]
    recovered = [run_id for run_id, log in zip(ids, logs, strict=True) if any(e.HasField("run_recovered") for e in log)]
    assert len(recovered) == 1 and recovered[0] in ids[:2]  # a's run, continued by b; the queued one just ran
    for log in logs:
        assert log[-1].final_response.text == "done"
        assert [s for e in log for s in range(e.first_seq or e.seq, e.seq + 1)] == list(range(1, log[-1].seq + 1))
    # the cut-off call is safe to repeat: it ran again, with the same idempotency key
    keys = fleet.executions("effect_safe")
    assert len(keys) == 4 and keys.count(next(k for k in keys if k.startswith(recovered[0]))) == 2


async def test_one_node_queued_runs_survive_kill_9_and_a_restart(tmp_path: Path, fake: FakeAnthropic) -> None:
    fleet = Fleet(tmp_path, fake, runs=ONE_SLOT, durable=DURABLE)
    try:
        fleet.hold()
        proc, port = await fleet.start("node")
        ids = await submit(port, 3, fleet=False)
        await started(fleet, 1)
        runs = await get(port, ids)
        assert [r.state for r in runs] == [pb.Run.RUNNING, pb.Run.QUEUED, pb.Run.QUEUED]
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        fleet.release()
        _, port = await fleet.start("node")
        final = await until_ended(port, ids)
        assert [r.state for r in final] == [pb.Run.SUCCEEDED] * 3
        assert runs_started(fleet) == set(ids)
    finally:
        await fleet.stop()


async def test_one_node_store_queue_positions_cancel_and_kill_9(tmp_path: Path, fake: FakeAnthropic) -> None:
    """`durable.queue: store` on one node: the queue is in the SQLite file; GetRun shows positions, a queued run is
    cancelled without starting, and after `kill -9` and a restart the running run is continued, the queued one runs."""
    fleet = Fleet(tmp_path, fake, runs=ONE_SLOT, durable={**DURABLE, "queue": "store"})
    try:
        fleet.hold()
        proc, port = await fleet.start("node")
        ids = await submit(port, 3)
        await started(fleet, 1)
        watcher = asyncio.create_task(watch(port, ids[2]))  # while queued: waits for its claim, not UNAVAILABLE
        runs = await get(port, ids)
        assert [(r.state, r.queue_position) for r in runs] == [
            (pb.Run.RUNNING, 0),
            (pb.Run.QUEUED, 1),
            (pb.Run.QUEUED, 2),
        ]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            answer = await stub(channel).CancelRun(pb.CancelRunRequest(run_id=ids[1]), timeout=10)
        assert answer.state == pb.Run.CANCELLED
        assert [r.queue_position for r in await get(port, ids[1:])] == [0, 1]
        await asyncio.sleep(0.3)
        assert not watcher.done()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        with pytest.raises(grpc.aio.AioRpcError):
            await watcher  # its server died
        fleet.release()
        _, port = await fleet.start("node")
        final = await until_ended(port, ids)
        assert [r.state for r in final] == [pb.Run.SUCCEEDED, pb.Run.CANCELLED, pb.Run.SUCCEEDED]
        assert runs_started(fleet) == {ids[0], ids[2]}
        continued, queued = await watch(port, ids[0]), await watch(port, ids[2])
        assert any(e.HasField("run_recovered") for e in continued)
        assert not any(e.HasField("run_recovered") for e in queued)
        for log in (continued, queued):
            assert log[-1].final_response.text == "done"
            assert [s for e in log for s in range(e.first_seq or e.seq, e.seq + 1)] == list(range(1, log[-1].seq + 1))
    finally:
        await fleet.stop()
