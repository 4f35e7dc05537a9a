"""Tool results of megabytes against a real server and clients with gRPC's default limits (4 MiB a message): the
stream carries them in parts, the unary answer stays bounded, and ended runs are kept within a byte budget."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import cli, run_events, stub
from fake_tools import Bulky, BulkyStream, Echo
from service.config import RunsConfig

DEFAULT_LIMIT = 4 * 2**20  # what grpc clients accept unless told otherwise (Python, grpc-js, grpcurl)
ROWS = 4200  # Bulky's result is then just over 4 MiB


def tools() -> dict[str, Any]:
    return {t.name: t for t in (Bulky(), BulkyStream(), Echo())}


def calls(*rows: int, name: str = "bulky") -> list[dict[str, Any]]:
    return [{"tool_calls": [{"name": name, "input": {"rows": n}} for n in rows]}, {"text": "done"}]


def joined(events: list[pb.AgentEvent], call_id: str) -> list[Any]:
    """Every piece of data of one call, as the client reassembles it: the JSON of the parts before each event that
    says it has `data_parts`."""
    found, pending = [], []
    for e in events:
        kind = e.WhichOneof("event")
        if kind == "tool_data_part" and e.tool_data_part.call_id == call_id:
            assert e.tool_data_part.index == len(pending)
            pending.append(e.tool_data_part.json)
        elif kind in ("tool_result_chunk", "tool_result") and getattr(e, kind).call_id == call_id:
            body = getattr(e, kind)
            assert body.data_parts == len(pending) and body.HasField("data") != bool(pending)
            found.append(json.loads("".join(pending)) if pending else None)
            pending = []
    return found


async def test_a_4_mib_tool_result_reaches_a_client_with_default_limits(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(calls(ROWS), tools=tools())
    expected = await Bulky().run(Bulky.Input(rows=ROWS))  # type: ignore[call-arg]
    assert len(json.dumps(expected, ensure_ascii=False).encode()) > DEFAULT_LIMIT
    events = await run_events(channel_to(svc), message="go")  # a default channel: it refuses a message over 4 MiB
    assert events[-1].HasField("final_response")
    assert max(e.ByteSize() for e in events) < 1.5 * 2**20
    (call_id,) = {e.tool_result.call_id for e in events if e.HasField("tool_result")}
    assert joined(events, call_id) == [expected]
    # the README's demo client renders it, with the data's size
    code, out, err = await cli(svc.port, "go")
    assert code == 0, err
    size = len(json.dumps(expected, ensure_ascii=False, separators=(",", ":")).encode())
    assert "← bulky ok in" in out and f"({size} bytes)" in out


async def test_large_chunks_of_a_streaming_tool_come_in_parts_too(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(calls(600, name="bulky_stream"), tools=tools())
    events = await run_events(channel_to(svc), message="go")
    assert max(e.ByteSize() for e in events) < 1.5 * 2**20
    (call_id,) = {e.tool_result.call_id for e in events if e.HasField("tool_result")}
    chunks = [c async for c in BulkyStream().stream(BulkyStream.Input(rows=600))]  # type: ignore[call-arg]
    assert joined(events, call_id) == [chunks[0], chunks[1], chunks]  # each chunk, then the result: all of them


async def test_the_unary_answer_stays_under_the_default_limit(start_service: Any, channel_to: Any) -> None:
    """Two 4 MiB results and a small one: the answer keeps what fits and says that it left the rest out."""
    svc = await start_service(calls(ROWS, ROWS, 3), tools=tools())
    reply = await stub(channel_to(svc)).RunAgentUnary(pb.RunAgentRequest(message="go"))
    assert reply.ByteSize() < DEFAULT_LIMIT / 2 + 2**16
    assert reply.final_response.text == "done" and reply.data_omitted
    results = [c.result for c in reply.tool_calls]
    assert [r.status for r in results] == [pb.TOOL_STATUS_OK] * 3
    assert [r.HasField("data") for r in results] == [False, False, True]
    assert [r.data_parts > 0 for r in results] == [True, True, False]
    assert len(results[2].data.struct_value["rows"]) == 3
    # a result in parts that fits is joined again for the unary answer
    svc = await start_service(calls(400), tools=tools())
    reply = await stub(channel_to(svc)).RunAgentUnary(pb.RunAgentRequest(message="go"))
    assert not reply.data_omitted and len(reply.tool_calls[0].result.data.struct_value["rows"]) == 400


async def test_ended_runs_past_the_byte_budget_are_forgotten_oldest_first(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(calls(ROWS), tools=tools(), runs={"max_retained_bytes": 6 * 2**20})
    channel = channel_to(svc)
    first = (await run_events(channel, message="one"))[0].run_id
    assert (await stub(channel).GetRun(pb.GetRunRequest(run_id=first))).state == pb.Run.SUCCEEDED
    second = (await run_events(channel, message="two"))[0].run_id  # 4 + 4 MiB: over the budget of 6
    with pytest.raises(grpc.aio.AioRpcError) as info:
        [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=first))]
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert f"run {first!r} ended and was forgotten" in info.value.details()
    assert "runs.max_retained_bytes = 6 MiB" in info.value.details()
    replay = [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=second))]
    assert replay[-1].HasField("final_response")


def test_the_default_budget_and_part_size() -> None:
    config = RunsConfig()
    assert config.max_retained_bytes == 256 * 2**20 and config.max_event_data_bytes == 256 * 1024
