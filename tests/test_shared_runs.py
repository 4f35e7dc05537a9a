"""Runs shared through the real Redis: two services on one key prefix, as two replicas behind one address. A run
started on A is seen, watched, cancelled and re-attached to on B, and a caller's quotas hold across both."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis.asyncio as aioredis
from backends import RedisNamespace, audit_key_file
from pydantic import BaseModel

from agent.v1 import agent_pb2 as pb
from conftest import stub
from fake_tools import all_tools
from service.aio import cancel_and_wait
from service.records.summaries import RunSummary
from service.rpc.server import Service
from service.run import RunState
from service.state import redis_runs
from tools.base import JSON, Tool

WORDS = " ".join(f"word{i}" for i in range(80))


class GateInput(BaseModel):
    label: str = "gate"


class Gate(Tool[GateInput]):
    """Waits until the test opens it: a run held mid-way, for as long as the test needs."""

    name = "gate"
    description = "Waits until opened."
    Input = GateInput

    def __init__(self, opened: asyncio.Event) -> None:
        self.opened = opened

    async def run(self, args: GateInput) -> JSON:
        await self.opened.wait()
        return {"opened": args.label}


GATED: list[dict[str, Any]] = [
    {"thinking": "Wait first.", "text": "Waiting. " + WORDS, "tool_calls": [{"name": "gate", "input": {}}]},
    {"text": "Done: " + WORDS},
]


def covered(events: list[pb.AgentEvent]) -> list[int]:
    return [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)]


async def replicas(
    start_service: Any,
    tmp_path: Path,
    ns: RedisNamespace,
    turns: list[dict[str, Any]],
    n: int = 2,
    state_options: dict[str, Any] | None = None,
    **config: Any,
) -> tuple[list[Service], asyncio.Event]:
    """`n` services on one Redis prefix, each with its own data dir, sharing one gate."""
    opened = asyncio.Event()
    services = []
    for i in range(n):
        tools = {**all_tools(), "gate": Gate(opened)}
        services.append(
            await start_service(
                turns,
                tools=tools,
                data_dir=tmp_path / f"replica{i}",
                state={"url": ns.url, "prefix": ns.prefix, **(state_options or {})},
                **config,
            )
        )
    return services, opened


async def read_until(call: Any, kind: str, seen: list[pb.AgentEvent]) -> None:
    async for event in call:
        seen.append(event)
        if event.HasField(kind):
            return
    raise AssertionError(f"no {kind} event")


async def status_of(call: Any, seen: list[pb.AgentEvent]) -> grpc.StatusCode:
    try:
        async for event in call:
            seen.append(event)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_a_run_on_a_is_got_and_watched_on_b_live_and_after_its_end(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    run_id = (await on_a.SubmitRun(pb.RunAgentRequest(message="go"))).run_id
    live: list[pb.AgentEvent] = []
    watch = on_b.WatchRun(pb.WatchRunRequest(run_id=run_id))
    await read_until(watch, "tool_call_ready", live)  # live on B while A is held in the tool call
    got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
    assert got.state == pb.Run.RUNNING and got.last_seq >= live[-1].seq
    opened.set()
    live += [e async for e in watch]
    run = a.registry.get(run_id)
    assert run.finished and live[-1].HasField("final_response")
    assert covered(live) == list(range(1, len(run.log) + 1))  # gapless, nothing twice
    # after the end: B replays exactly what A does, deliveries, seqs, times and all
    from_a = [e async for e in on_a.WatchRun(pb.WatchRunRequest(run_id=run_id))]
    from_b = [e async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id))]
    assert [e.SerializeToString() for e in from_b] == [e.SerializeToString() for e in from_a]
    assert covered(from_b) == list(range(1, len(run.log) + 1))
    middle = len(run.log) // 2
    after_a = [e async for e in on_a.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=middle))]
    after_b = [e async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=middle))]
    assert [e.SerializeToString() for e in after_b] == [e.SerializeToString() for e in after_a]
    assert after_b[0].seq == middle + 1 or after_b[0].first_seq == middle + 1
    got_a, got_b = (
        await on_a.GetRun(pb.GetRunRequest(run_id=run_id)),
        await on_b.GetRun(pb.GetRunRequest(run_id=run_id)),
    )
    assert got_b.state == pb.Run.SUCCEEDED and got_b.last_seq == len(run.log)
    assert got_b.final_response == got_a.final_response and got_b.created == got_a.created
    with pytest.raises(grpc.aio.AioRpcError) as out_of_range:
        await on_b.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=len(run.log) + 1)).read()
    assert out_of_range.value.code() == grpc.StatusCode.OUT_OF_RANGE
    with pytest.raises(grpc.aio.AioRpcError) as unknown:
        await on_b.GetRun(pb.GetRunRequest(run_id="run_nope"))
    assert unknown.value.code() == grpc.StatusCode.NOT_FOUND


async def test_a_stream_dropped_on_a_resumes_on_b_from_its_last_seq(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    first: list[pb.AgentEvent] = []
    call = on_a.RunAgent(pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE))
    await read_until(call, "tool_call_ready", first)
    call.cancel()  # at once, on B: what A streamed may not be shipped yet; B waits for it rather than refuse
    rest = on_b.WatchRun(pb.WatchRunRequest(run_id=first[0].run_id, after_seq=first[-1].seq))
    opened.set()
    events = first + [e async for e in rest]
    assert covered(events) == list(range(1, len(a.registry.get(first[0].run_id).log) + 1))


@pytest.mark.parametrize("mode", [pb.CancelRunRequest.IMMEDIATE, pb.CancelRunRequest.AFTER_TURN])
async def test_cancel_run_on_b_stops_the_run_a_drives(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace, mode: int
) -> None:
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    seen: list[pb.AgentEvent] = []
    call = on_a.RunAgent(pb.RunAgentRequest(message="go"))
    await read_until(call, "tool_call_ready", seen)
    run_id = seen[0].run_id
    reply = await on_b.CancelRun(pb.CancelRunRequest(run_id=run_id, mode=mode))
    assert reply.run_id == run_id
    if mode == pb.CancelRunRequest.IMMEDIATE:
        assert reply.state == pb.Run.CANCELLED  # the final state, within the second CancelRun waits
    else:
        assert reply.state == pb.Run.RUNNING  # the turn goes on: its tool call finishes first
        opened.set()
    assert await status_of(call, seen) == grpc.StatusCode.CANCELLED
    run = a.registry.get(run_id)
    assert run.state is RunState.CANCELLED
    results = [e.tool_result for e in seen if e.HasField("tool_result")]
    if mode == pb.CancelRunRequest.IMMEDIATE:
        assert results[0].status == pb.TOOL_STATUS_CANCELLED
        assert seen[-1].error.message == "cancelled by CancelRun"
    else:
        assert results[0].status == pb.TOOL_STATUS_OK
        assert seen[-1].error.message == "cancelled by CancelRun after the current turn"
        assert not any(e.HasField("final_response") for e in seen)
    await a.registry.store.shipper.flushed(5)  # type: ignore[union-attr]  # B sees A's runs as A ships them
    again = await on_b.CancelRun(pb.CancelRunRequest(run_id=run_id, mode=mode))
    assert again.state == pb.Run.CANCELLED
    got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
    assert got.state == pb.Run.CANCELLED and got.error.code == "CANCELLED"


async def test_an_idempotency_key_reused_on_b_reattaches_to_the_run_on_a(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    request = pb.RunAgentRequest(message="go", idempotency_key="order-1")
    first: list[pb.AgentEvent] = []
    call_a = on_a.RunAgent(request)
    await read_until(call_a, "tool_call_ready", first)
    run_id = first[0].run_id
    assert (await on_b.SubmitRun(request)).run_id == run_id
    call_b = on_b.RunAgent(request)
    again: list[pb.AgentEvent] = []
    await read_until(call_b, "tool_call_ready", again)
    assert again[0].run_id == run_id and again[0].seq == 1
    with pytest.raises(grpc.aio.AioRpcError) as conflict:
        await on_b.SubmitRun(pb.RunAgentRequest(message="something else", idempotency_key="order-1"))
    assert conflict.value.code() == grpc.StatusCode.ALREADY_EXISTS
    opened.set()
    first += [e async for e in call_a]
    again += [e async for e in call_b]
    assert covered(again) == covered(first) == list(range(1, len(a.registry.get(run_id).log) + 1))
    assert again[-1].final_response == first[-1].final_response
    unary = await on_b.RunAgentUnary(request)  # attached on B to A's ended run: its answer
    assert unary.run_id == run_id and unary.final_response == first[-1].final_response
    assert len(a.registry.runs) == 1 and not b.registry.runs  # one run in the fleet


async def test_a_cancel_published_while_the_owner_was_away_is_seen_when_it_listens_again(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    (a,), _ = await replicas(start_service, tmp_path, redis_ns, GATED, n=1)
    on_a = stub(channel_to(a))
    seen: list[pb.AgentEvent] = []
    call = on_a.RunAgent(pb.RunAgentRequest(message="go"))
    await read_until(call, "tool_call_ready", seen)
    store = a.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    control = next(t for t in store._tasks if t.get_name() == "state store control")
    await cancel_and_wait([control], 5)  # its subscription is gone, as when its connection to Redis breaks
    client = aioredis.Redis.from_url(redis_ns.url)
    try:  # what CancelRun on another replica writes (its PUBLISH reaches nobody now)
        await client.hset(f"{redis_ns.prefix}run:{seen[0].run_id}", "cancel_requested", "now")
    finally:
        await client.aclose()
    store._spawn(store._listen(), "state store control")  # subscribed again: it reads the runs' hashes
    assert await status_of(call, seen) == grpc.StatusCode.CANCELLED
    assert seen[-1].error.message == "cancelled by CancelRun"


async def test_a_callers_concurrency_and_rate_hold_across_replicas(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    limits = {"anonymous": {"name": "anonymous", "max_concurrent_runs": 1, "runs_per_minute": 3}}
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED, auth=limits)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    first = await on_a.SubmitRun(pb.RunAgentRequest(message="1"))
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await on_b.SubmitRun(pb.RunAgentRequest(message="2"))
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert busy.value.details() == "caller anonymous has 1 runs in progress, its limit; wait for one to end"
    opened.set()
    await a.registry.get(first.run_id).ended()
    await a.registry.store.shipper.flushed(5)  # type: ignore[union-attr]  # the run's end releases its slot
    for message in ("2", "3"):  # the second and third runs of this minute, one after the other, on B then A
        on = on_b if message == "2" else on_a
        done = [e async for e in on.RunAgent(pb.RunAgentRequest(message=message))]
        assert done[-1].HasField("final_response")
        await (a if message == "3" else b).registry.store.shipper.flushed(5)  # type: ignore[union-attr]
    with pytest.raises(grpc.aio.AioRpcError) as rate:
        await on_b.SubmitRun(pb.RunAgentRequest(message="4"))
    assert rate.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert rate.value.details().startswith("caller anonymous started 3 runs in the last minute, its limit; retry in ")


async def test_a_dead_replicas_runs_release_their_callers_slot_and_their_watchers(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    limits = {"anonymous": {"name": "anonymous", "max_concurrent_runs": 1}}
    quick = {"lease_s": 1.0, "probe_s": 0.2, "read_block_s": 0.2}
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED, auth=limits, state_options=quick)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    run_id = (await on_a.SubmitRun(pb.RunAgentRequest(message="go"))).run_id
    seen: list[pb.AgentEvent] = []
    watch = on_b.WatchRun(pb.WatchRunRequest(run_id=run_id))
    await read_until(watch, "tool_call_ready", seen)
    with pytest.raises(grpc.aio.AioRpcError) as busy:
        await on_b.SubmitRun(pb.RunAgentRequest(message="2"))
    assert busy.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    store = a.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    await cancel_and_wait(list(store._tasks), 5)  # A goes silent: no shipping, no lease renewal
    assert await status_of(watch, seen) == grpc.StatusCode.UNAVAILABLE  # B's watcher is told, not left waiting
    again = await on_b.SubmitRun(pb.RunAgentRequest(message="2"))  # the lease ran out: the slot is free
    assert again.run_id
    opened.set()
    await store.start()  # A comes back, and ships the rest before it closes


async def test_a_dead_replicas_run_that_is_not_durable_reads_failed_and_cannot_be_cancelled(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """An outside finding: a run whose replica was killed read RUNNING forever (GetRun, ListRuns) and CancelRun
    answered RUNNING, though nothing would ever go on with it. Once the lease is gone a run that is not durable reads
    FAILED (UNAVAILABLE, saying why); a durable one still reads RUNNING: a process continues it."""
    quick = {"lease_s": 1.0, "probe_s": 0.2, "read_block_s": 0.2}
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED, state_options=quick)
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    plain = pb.RunAgentRequest(message="go", durability=pb.RunAgentRequest.NOT_DURABLE)
    kept = pb.RunAgentRequest(message="go", durability=pb.RunAgentRequest.DURABLE)
    run_id, kept_id = (await on_a.SubmitRun(plain)).run_id, (await on_a.SubmitRun(kept)).run_id
    for _ in range(200):  # both shipped and seen from B
        states = [(await on_b.GetRun(pb.GetRunRequest(run_id=i))).state for i in (run_id, kept_id)]
        if states == [pb.Run.RUNNING] * 2:
            break
        await asyncio.sleep(0.02)
    store = a.registry.store
    assert isinstance(store, redis_runs.RedisRunStore)
    await cancel_and_wait(list(store._tasks), 5)  # A goes silent: no shipping, no lease renewal
    got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
    for _ in range(200):  # the lease (1 s) runs out
        if got.state != pb.Run.RUNNING:
            break
        await asyncio.sleep(0.05)
        got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
    assert got.state == pb.Run.FAILED and got.error.code == "UNAVAILABLE" and got.error.retryable
    assert "stopped renewing its lease" in got.error.message and "not durable" in got.error.message
    assert (await on_b.GetRun(pb.GetRunRequest(run_id=kept_id))).state == pb.Run.RUNNING
    running = await on_b.ListRuns(pb.ListRunsRequest(states=[pb.Run.RUNNING]))
    assert [r.run_id for r in running.runs] == [kept_id]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await on_b.CancelRun(pb.CancelRunRequest(run_id=run_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "already ended (failed)" in err.value.details()
    seen: list[pb.AgentEvent] = []  # a watcher that comes now is told at once, as GetRun tells
    watch = on_b.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=10)
    assert await status_of(watch, seen) == grpc.StatusCode.UNAVAILABLE
    assert "stopped renewing its lease" in (await watch.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as far:
        await anext(aiter(on_b.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=10**6))))
    assert far.value.code() == grpc.StatusCode.UNAVAILABLE  # that it is gone comes before any seq
    opened.set()
    await store.start()  # A comes back, and ships the rest before it closes


async def test_a_draining_replica_tells_its_watchers_of_other_replicas_runs_where_to_go(
    start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    """An outside finding: a drain cut WatchRun streams of runs driven elsewhere with "Cancelling all calls"."""
    (a, b), opened = await replicas(start_service, tmp_path, redis_ns, GATED)
    run_id = (await stub(channel_to(a)).SubmitRun(pb.RunAgentRequest(message="go"))).run_id
    seen: list[pb.AgentEvent] = []
    watch = stub(channel_to(b)).WatchRun(pb.WatchRunRequest(run_id=run_id))
    await read_until(watch, "tool_call_ready", seen)
    drain = asyncio.create_task(b.drain(grace=0.1))
    try:
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for event in watch:
                seen.append(event)
        assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "shutting down" in (ended.value.details() or "") and "resume with WatchRun" in (
            ended.value.details() or ""
        )
        assert not a.registry.get(run_id).finished  # the run goes on where it runs
    finally:
        await drain
        opened.set()


async def test_get_run_on_b_answers_from_postgresql_once_redis_forgot_the_run(
    postgres_schema: Any, start_service: Any, channel_to: Any, tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    # postgres_schema first: its schema is dropped after the services (set up later, closed first) wrote to it
    (a, b), opened = await replicas(
        start_service,
        tmp_path,
        redis_ns,
        GATED,
        records={"url": postgres_schema.url},
        audit={"key_file": audit_key_file(tmp_path)},
        runs={"retention_s": 1},
    )
    on_a, on_b = stub(channel_to(a)), stub(channel_to(b))
    opened.set()
    done = [e async for e in on_a.RunAgent(pb.RunAgentRequest(message="go"))]
    run_id = done[0].run_id
    await a.registry.store.shipper.flushed(5)  # type: ignore[union-attr]
    got = await on_b.GetRun(pb.GetRunRequest(run_id=run_id))
    await a.registry.summary_writer.flushed()
    client = aioredis.Redis.from_url(redis_ns.url)
    try:
        assert await client.delete(f"{redis_ns.prefix}run:{run_id}", f"{redis_ns.prefix}run:{run_id}:events") == 2
    finally:
        await client.aclose()  # as the retention TTL would
    assert await on_b.GetRun(pb.GetRunRequest(run_id=run_id)) == got


class Summaries:
    """A run-summary store in a dict: the protocol's behaviour, for the registry's side of it (the SQLite and
    PostgreSQL stores are tested with the records)."""

    def __init__(self) -> None:
        self.kept: dict[str, RunSummary] = {}

    async def put(self, summary: RunSummary) -> None:
        self.kept.setdefault(summary.run_id, summary)

    async def put_many(self, summaries: Sequence[RunSummary]) -> None:
        for summary in summaries:
            await self.put(summary)

    async def get(self, run_id: str) -> RunSummary | None:
        return self.kept.get(run_id)


async def test_get_run_answers_from_the_summary_once_the_run_is_forgotten(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(runs={"max_retained_runs": 1})
    summaries = svc.registry.summaries = Summaries()
    on = stub(channel_to(svc))
    first = [e async for e in on.RunAgent(pb.RunAgentRequest(message="one"))]
    got = await on.GetRun(pb.GetRunRequest(run_id=first[0].run_id))
    [e async for e in on.RunAgent(pb.RunAgentRequest(message="two"))]
    assert svc.registry.sweep() == 1  # the first is forgotten: one run kept
    await svc.registry.summary_writer.flushed()
    assert first[0].run_id not in svc.registry.runs and first[0].run_id in summaries.kept
    assert await on.GetRun(pb.GetRunRequest(run_id=first[0].run_id)) == got
    svc.registry.summaries = None
    with pytest.raises(grpc.aio.AioRpcError) as forgotten:
        await on.GetRun(pb.GetRunRequest(run_id=first[0].run_id))
    assert forgotten.value.code() == grpc.StatusCode.NOT_FOUND
