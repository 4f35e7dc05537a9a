"""ListRuns: a caller's runs newest first, paged by a token that stays stable while runs start, filtered by state and
caller; on one process (memory state, SQLite summaries) and on a fleet's stores (Redis, PostgreSQL)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import redis.asyncio as redis
from backends import PostgresSchema, RedisNamespace, audit_key_file

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.callers import token_hash
from service.listing import decode_token, encode_token

TOKENS = {"alice": "token-alice", "bob": "token-bob", "ops": "token-ops"}
AUTH = {
    "required": True,
    "callers": [
        {"name": name, "token_sha256": [token_hash(token)], "admin": name == "ops"} for name, token in TOKENS.items()
    ],
}
# a run that waits on the `gate` tool until the test opens it: it stays RUNNING meanwhile
GATED = [{"text": "waiting", "tool_calls": [{"name": "gate", "input": {}}]}, {"text": "done"}]


def as_(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {TOKENS[name]}")]


def gated_tools(opened: asyncio.Event) -> dict[str, Any]:
    from test_shared_runs import Gate as SharedGate

    from fake_tools import all_tools

    return {**all_tools(), "gate": SharedGate(opened)}


async def finished(api: Any, run_id: str, who: str) -> pb.Run:
    for _ in range(500):
        run = await api.GetRun(pb.GetRunRequest(run_id=run_id), metadata=as_(who))
        if run.state in (pb.Run.SUCCEEDED, pb.Run.FAILED, pb.Run.CANCELLED):
            return run
        await asyncio.sleep(0.01)
    raise AssertionError(f"run {run_id} did not end")


async def listed(api: Any, who: str, **request: Any) -> tuple[list[str], str]:
    answer = await api.ListRuns(pb.ListRunsRequest(**request), metadata=as_(who))
    return [r.run_id for r in answer.runs], answer.next_page_token


async def all_pages(api: Any, who: str, **request: Any) -> list[str]:
    ids: list[str] = []
    token = ""
    while True:
        page, token = await listed(api, who, page_token=token, **request)
        ids += page
        if not token:
            return ids


async def exercise(replicas: list[Any], channel_to: Any, opened: asyncio.Event) -> None:
    """Five ended runs of alice, one of bob, one of alice held running; then paging, filters and rights."""
    apis = [stub(channel_to(svc)) for svc in replicas]
    ended = []
    for i in range(5):  # alternating replicas: listed from every place, each once
        api = apis[i % len(apis)]
        answer = await api.SubmitRun(pb.RunAgentRequest(message=f"m{i}", tools=["echo"]), metadata=as_("alice"))
        ended.append(answer.run_id)
        await finished(api, answer.run_id, "alice")
    bob = (await apis[0].SubmitRun(pb.RunAgentRequest(message="b", tools=["echo"]), metadata=as_("bob"))).run_id
    await finished(apis[0], bob, "bob")
    opened.clear()
    running = await apis[-1].SubmitRun(pb.RunAgentRequest(message="gated", tools=["gate"]), metadata=as_("alice"))
    newest_first = [running.run_id, *reversed(ended)]
    api = apis[0]
    # another replica's run is listed from the shared store once there: its record comes with its first events
    await api.GetRun(pb.GetRunRequest(run_id=running.run_id), metadata=as_("alice"))

    got = await all_pages(api, "alice", page_size=2)
    assert got == newest_first, "\n".join(map(str, [*got, "--", *newest_first]))
    first, token = await listed(api, "alice", page_size=2)
    # runs started after the first page do not shift the next one
    late = (await api.SubmitRun(pb.RunAgentRequest(message="late", tools=["echo"]), metadata=as_("alice"))).run_id
    second, _ = await listed(api, "alice", page_size=2, page_token=token)
    assert first + second == newest_first[:4]
    await finished(api, late, "alice")

    only_running, _ = await listed(api, "alice", states=[pb.Run.RUNNING, pb.Run.QUEUED])
    assert only_running == [running.run_id]
    succeeded, _ = await listed(api, "alice", states=[pb.Run.SUCCEEDED])
    assert succeeded == [late, *reversed(ended)]
    answer = await api.ListRuns(pb.ListRunsRequest(), metadata=as_("bob"))
    assert [(r.run_id, r.caller, r.state) for r in answer.runs] == [(bob, "bob", pb.Run.SUCCEEDED)]
    assert answer.runs[0].final_response.text

    # another caller's runs: only for an admin
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.ListRuns(pb.ListRunsRequest(caller="alice"), metadata=as_("bob"))
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert (await listed(api, "ops", caller="bob"))[0] == [bob]
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await api.ListRuns(pb.ListRunsRequest(page_token="not-a-token"), metadata=as_("alice"))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as big:
        await api.ListRuns(pb.ListRunsRequest(page_size=501), metadata=as_("alice"))
    assert big.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    opened.set()
    await finished(apis[-1], running.run_id, "alice")


async def test_list_runs_pages_and_filters_on_memory_and_sqlite(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    opened = asyncio.Event()
    svc = await start_service(
        GATED, tools=gated_tools(opened), auth=AUTH, runs={"keep_summaries": True, "retention_s": 0.2}
    )
    await exercise([svc], channel_to, opened)
    # past retention the process forgot the runs: the SQLite summaries list them, in the same order
    await asyncio.sleep(0.5)
    svc.registry.sweep()
    assert not [r for r in svc.registry.runs.values() if r.caller == "alice"]
    assert len(await all_pages(stub(channel_to(svc)), "alice", page_size=3)) == 7


async def test_list_runs_on_redis_and_postgres_across_replicas(
    redis_ns: RedisNamespace, postgres_schema: PostgresSchema, start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    # the stores' fixtures first: torn down after the services that use them
    opened = asyncio.Event()
    replicas = [
        await start_service(
            GATED,
            tools=gated_tools(opened),
            auth=AUTH,
            data_dir=tmp_path / f"replica{i}",
            state={"url": redis_ns.url, "prefix": redis_ns.prefix},
            records={"url": postgres_schema.url},
            audit={"key_file": audit_key_file(tmp_path)},
        )
        for i in range(2)
    ]
    await exercise(replicas, channel_to, opened)
    # the live state forgets the runs (Redis keys expired, the processes swept them): PostgreSQL's summaries list them
    expected = await all_pages(stub(channel_to(replicas[0])), "alice")
    for svc in replicas:
        await svc.registry.summary_writer.flushed()  # each ended run's summary is written behind its end
        await svc.registry.summaries._records.settle()  # type: ignore[union-attr]
        svc.registry.runs.clear()
    client = redis.Redis.from_url(redis_ns.url)
    keys = [key async for key in client.scan_iter(match=f"{redis_ns.prefix}*", count=1000)]
    await client.delete(*keys)
    await client.aclose()
    got = await all_pages(stub(channel_to(replicas[1])), "alice", page_size=3)
    missing = [r for r in expected if r not in got]
    debug = [(r, await replicas[0].registry.summaries.get(r)) for r in missing]
    assert got == expected, debug


async def test_list_runs_over_http(start_service: Any, tmp_path: Path) -> None:
    svc = await start_service(auth=AUTH, http_listen="127.0.0.1:0")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        headers = {"authorization": f"Bearer {TOKENS['alice']}"}
        ids = [
            (await http.post("/v1/runs", json={"message": f"m{i}"}, headers=headers)).json()["runId"] for i in range(3)
        ]
        for _ in range(500):
            page = (await http.get("/v1/runs", params={"state": "succeeded"}, headers=headers)).json()
            if len(page.get("runs", [])) == 3:
                break
            await asyncio.sleep(0.01)
        assert [r["runId"] for r in page["runs"]] == ids[::-1]
        first = (await http.get("/v1/runs", params={"page_size": 2}, headers=headers)).json()
        rest = (await http.get("/v1/runs", params={"page_token": first["nextPageToken"]}, headers=headers)).json()
        assert [r["runId"] for r in first["runs"] + rest["runs"]] == ids[::-1]
        assert "nextPageToken" not in rest
        bad = await http.get("/v1/runs", params={"state": "sleeping"}, headers=headers)
        assert bad.status_code == 400


def test_page_tokens_round_trip_and_refuse_forgeries() -> None:
    assert decode_token(encode_token((1_700_000_000_123_456_789, "run_ab:c"))) == (
        1_700_000_000_123_456_789,
        "run_ab:c",
    )
    assert decode_token("") is None
    for forged in ("v1.!!!", "v2.MTox", "v1." + "A" * 300):
        with pytest.raises(Exception, match="page_token"):
            decode_token(forged)
