"""The real gRPC server on 127.0.0.1:0: full runs, status codes, cancellation, deadlines, health and drain."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from agent.v1 import agent_pb2 as pb
from conftest import make_config, run_events, run_events_of, stub
from fake_tools import all_tools
from service.wiring import start


async def test_full_run_streams_numbered_events(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    events = await run_events(channel_to(svc), message="what now?", metadata={"caller": "risk-engine"})
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "final_response"
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert len({e.run_id for e in events}) == 1 and events[0].run_id.startswith("run_")
    assert all(e.time.seconds > 0 for e in events)
    assert set(kinds) >= {"thinking", "text_delta", "tool_call", "tool_call_delta", "tool_call_ready", "usage"}
    started = events[0].run_started
    assert started.model == "scripted:test" and set(started.tools) == set(all_tools()) and started.max_turns == 10
    ready = next(e.tool_call_ready for e in events if e.HasField("tool_call_ready"))
    assert dict(ready.input) == {"text": "hi"}
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.status == pb.TOOL_STATUS_OK and result.name == "echo"
    assert dict(result.data.struct_value) == {"echo": "hi"}
    assert result.duration.ToNanoseconds() >= 0
    final = events[-1].final_response
    assert final.text.startswith("The answer: ") and final.turns == 2 and final.tool_calls == 1


async def test_parallel_tool_calls_interleave_over_grpc(start_service: Any, channel_to: Any) -> None:
    calls = [{"name": "meet", "input": {"who": "a"}}, {"name": "meet", "input": {"who": "b"}}]
    svc = await start_service([{"tool_calls": calls}, {"text": "ok"}], limits={"tool_timeout_s": 2})
    events = await run_events(channel_to(svc))
    results = [e.tool_result for e in events if e.HasField("tool_result")]
    assert [r.status for r in results] == [pb.TOOL_STATUS_OK] * 2
    assert {json.dumps(dict(r.data.struct_value)) for r in results} == {'{"met": "a"}', '{"met": "b"}'}


@pytest.mark.parametrize(
    ("request_fields", "message"),
    [
        ({"message": ""}, "message must not be empty"),
        ({"message": "   "}, "message must not be empty"),
        ({"message": "x" * 2001}, "message is 2001 bytes; the limit is 2000 bytes"),
        ({"message": "hi", "tools": ["echo", "teleport"]}, "unknown tool(s): teleport; available:"),
        ({"message": "hi", "tools": ["echo", "count", "echo"]}, "tools lists echo more than once"),
        ({"message": "hi", "on_disconnect": 7}, "unknown on_disconnect 7: CANCEL or CONTINUE"),
        ({"message": "hi", "durability": 5}, "unknown durability 5: DURABLE or NOT_DURABLE"),
        ({"message": "hi", "idempotency_key": "k" * 257}, "idempotency_key is 257 bytes; the limit is 256 bytes"),
        ({"message": "hi", "metadata": {"": "v"}}, "metadata has an empty key"),
        ({"message": "hi", "model": "m" * 257}, "model is 257 bytes; a model id has at most 256 bytes"),
        ({"message": "hi", "max_turns": 0}, "max_turns must be between 1 and 50, got 0"),
        ({"message": "hi", "max_turns": 51}, "max_turns must be between 1 and 50, got 51"),
        ({"message": "hi", "max_tokens": 0}, "max_tokens must be between 1 and 64000, got 0"),
    ],
)
async def test_invalid_requests_get_invalid_argument(
    start_service: Any, channel_to: Any, request_fields: dict[str, Any], message: str
) -> None:
    svc = await start_service(limits={"max_message_bytes": 2000})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(svc), **request_fields)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in (info.value.details() or "")


async def test_a_long_list_of_repeated_tools_is_refused_quickly(start_service: Any, channel_to: Any) -> None:
    """The message names the repeated tools; counting them per entry took minutes of event loop for 100,000."""
    svc = await start_service()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events_of(
            stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="hi", tools=["echo"] * 50_000), timeout=5)
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "tools lists echo more than once"


async def test_many_unknown_tools_are_named_within_the_trailers_limit(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    names = [f"tool_{i:05d}_{'x' * 50}" for i in range(2000)]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(svc), tools=names)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.value.details() or "").startswith(f"unknown tool(s): {names[0]}, {names[1]}")
    assert "and 1990 more; available: " in (info.value.details() or "")


async def test_a_status_message_quoting_a_huge_run_id_is_cut(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel_to(svc)).GetRun(pb.GetRunRequest(run_id="r" * 100_000))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND  # not RESOURCE_EXHAUSTED: the trailers stay small
    details = info.value.details() or ""
    assert details.startswith("no run 'rrr") and details.endswith("…") and len(details) == 2000


async def test_a_refusal_carries_its_reason_for_a_program_to_read(start_service: Any, channel_to: Any) -> None:
    """An outside finding: the docs name reasons (RUN_HANDED_OVER, RUN_INTERRUPTED…) that only the HTTP face sent;
    over gRPC a client had to parse English. The trailers carry a google.rpc.Status with an ErrorInfo now."""
    two_turns = [{"text": "Echo.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]}, {"text": "Done."}]
    svc = await start_service(two_turns)
    service = stub(channel_to(svc))
    call = service.GetRun(pb.GetRunRequest(run_id="run_nope"))
    with pytest.raises(grpc.aio.AioRpcError):
        await call
    status = await rpc_status.aio.from_call(call)  # checks the code and message agree with the call's
    assert status is not None and status.code == grpc.StatusCode.NOT_FOUND.value[0]
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("RUN_NOT_FOUND", "agent.v1", {"retryable": "false"})
    # a run's own failure: its error event's code and retryable, named as the run's failure
    stream = service.RunAgent(pb.RunAgentRequest(message="hi", tools=["echo"], max_turns=1))
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await run_events_of(stream)
    assert failed.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    status = await rpc_status.aio.from_call(stream)
    assert status is not None and status.details[0].Unpack(info)
    assert (info.reason, dict(info.metadata)) == ("RUN_FAILED", {"retryable": "false"})


async def test_an_unknown_method_is_refused_with_its_reason_too(start_service: Any, channel_to: Any) -> None:
    """An outside finding: grpc's own answer to a method no service has carried no ErrorInfo."""
    svc = await start_service()
    call = channel_to(svc).unary_unary("/agent.v1.AgentService/Nope")(b"")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED and "/agent.v1.AgentService/Nope" in str(
        refused.value.details()
    )
    status, info = await rpc_status.aio.from_call(call), error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("METHOD_NOT_FOUND", "agent.v1")
    health = health_pb2_grpc.HealthStub(channel_to(svc))  # the services registered before it still answer
    assert (await health.Check(health_pb2.HealthCheckRequest())).status == health_pb2.HealthCheckResponse.SERVING


async def test_run_id_and_cancel_mode_are_checked(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    service = stub(channel_to(svc))
    calls = [
        service.GetRun(pb.GetRunRequest()),
        service.CancelRun(pb.CancelRunRequest()),
        run_events_of(service.WatchRun(pb.WatchRunRequest())),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert (info.value.details() or "").startswith("run_id is required")
    run_id = (await run_events(channel_to(svc)))[0].run_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await service.CancelRun(pb.CancelRunRequest(run_id=run_id, mode=9))  # type: ignore[arg-type]
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.details() == "unknown mode 9: IMMEDIATE or AFTER_TURN"


async def test_run_restricted_to_a_tool_subset(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    events = await run_events(channel_to(svc), tools=["count"])
    assert list(events[0].run_started.tools) == ["count"]
    assert not any(e.HasField("tool_call") for e in events)  # the scenario's echo call was not offered


async def test_failed_run_ends_with_error_event_and_status(start_service: Any, channel_to: Any) -> None:
    call = {"tool_calls": [{"name": "echo", "input": {"text": "again"}}]}
    svc = await start_service([call, call, call])
    call_ = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="loop", max_turns=2))
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in call_:
            seen.append(event)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "max_turns=2" in (info.value.details() or "")
    assert seen[-1].HasField("error")
    assert seen[-1].error.code == "RESOURCE_EXHAUSTED" and not seen[-1].error.retryable


async def test_model_unavailable_maps_to_unavailable(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(
        [{"text": "x", "fail": {"status": 529, "times": 9}}],
        model={"retry": {"attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.001}},
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(svc))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "after 2 attempt(s)" in (info.value.details() or "")


class TimingOutModel:
    """Its stream raises TimeoutError, as an SDK or socket read timeout that an adapter let through would."""

    default_model = "timing-out"

    async def aclose(self) -> None:
        pass

    async def stream_turn(self, request: Any) -> AsyncIterator[Any]:
        raise TimeoutError("The read operation timed out")
        yield


async def test_a_model_timeout_is_unavailable_not_the_runs_deadline(tmp_path: Path, channel_to: Any) -> None:
    config = make_config(tmp_path, model={"retry": {"attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.001}})
    svc = await start(config, metrics=False, tools=all_tools(), model=TimingOutModel())
    seen: list[pb.AgentEvent] = []
    try:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for event in stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="hi")):
                seen.append(event)
    finally:
        await svc.server.stop(0)
        await svc.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert (seen[-1].error.code, seen[-1].error.retryable) == ("UNAVAILABLE", True)
    assert "after 2 attempt(s): the model timed out" in seen[-1].error.message


def idle(svc: Any) -> bool:
    return not svc.servicer.streams and all(run.finished for run in svc.registry.runs.values())


async def _until_tool_runs(call: Any) -> list[pb.AgentEvent]:
    seen = []
    async for event in call:
        seen.append(event)
        if event.HasField("tool_call_ready"):
            return seen
    raise AssertionError("the tool never started")


async def test_client_cancel_stops_tools_and_leaves_no_task(start_service: Any, channel_to: Any) -> None:
    tools = all_tools()
    calls = [{"name": "sleep", "input": {"seconds": 30}}] * 2
    svc = await start_service([{"tool_calls": calls}, {"text": "never"}], tools=tools)
    channel = channel_to(svc)
    await run_events(channel, tools=["echo"])  # warm up: let grpc start its own long-lived tasks
    baseline = len(asyncio.all_tasks())
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="sleep"))
    await _until_tool_runs(call)
    await asyncio.sleep(0.05)
    call.cancel()
    for _ in range(200):
        if tools["sleep"].cancelled == 2 and idle(svc):  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert tools["sleep"].cancelled == 2  # type: ignore[attr-defined]
    assert tools["sleep"].finished == 0  # type: ignore[attr-defined]
    assert idle(svc)
    for _ in range(100):
        if len(asyncio.all_tasks()) <= baseline:
            break
        await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) <= baseline


async def test_deadline_cancels_the_run(start_service: Any, channel_to: Any) -> None:
    tools = all_tools()
    svc = await start_service([{"tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}], tools=tools)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="slow"), timeout=0.5):
            pass
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    for _ in range(200):
        if tools["sleep"].cancelled == 1:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    assert tools["sleep"].cancelled == 1  # type: ignore[attr-defined]


async def test_list_tools(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    response = await stub(channel_to(svc)).ListTools(pb.ListToolsRequest())
    by_name = {t.name: t for t in response.tools}
    assert set(by_name) == set(all_tools())
    echo = by_name["echo"]
    assert echo.description == "Echoes text." and not echo.streaming
    assert echo.input_schema["properties"]["times"]["maximum"] == 3
    assert by_name["count"].streaming


async def _health(channel: grpc.aio.Channel, service: str = "") -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_health_and_graceful_drain(start_service: Any, channel_to: Any) -> None:
    calls = [{"name": "sleep", "input": {"seconds": 0.3}}]
    svc = await start_service([{"tool_calls": calls}, {"text": "finished"}], shutdown_grace_s=10)
    channel = channel_to(svc)
    assert await _health(channel) == health_pb2.HealthCheckResponse.SERVING
    assert await _health(channel, "agent.v1.AgentService") == health_pb2.HealthCheckResponse.SERVING
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="in flight"))
    seen = await _until_tool_runs(call)
    drain = asyncio.create_task(svc.drain())
    await asyncio.sleep(0.05)
    assert await _health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    seen += [e async for e in call]  # the in-flight run finishes within the grace period
    assert seen[-1].final_response.text == "finished"
    await drain


async def test_health_watch_and_list_on_the_main_port(start_service: Any, channel_to: Any) -> None:
    """Watch is a handler that writes with `context.write` (not an async generator): the interceptors' wrappers
    must keep that style, or every Watch fails with UNKNOWN. Clients with a health-checking service config use it."""
    svc = await start_service(shutdown_grace_s=0)
    health = health_pb2_grpc.HealthStub(channel_to(svc))
    listed = await health.List(health_pb2.HealthListRequest())
    assert {name: r.status for name, r in listed.statuses.items()} == {
        "": health_pb2.HealthCheckResponse.SERVING,
        "agent.v1.AgentService": health_pb2.HealthCheckResponse.SERVING,
    }
    watch = health.Watch(health_pb2.HealthCheckRequest(service="agent.v1.AgentService"))
    first = await asyncio.wait_for(watch.read(), 5)
    assert first.status == health_pb2.HealthCheckResponse.SERVING
    drain = asyncio.create_task(svc.drain())
    second = await asyncio.wait_for(watch.read(), 5)
    assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
    watch.cancel()
    await drain


async def test_drain_cancels_runs_still_going_after_grace(start_service: Any, channel_to: Any) -> None:
    tools = all_tools()
    svc = await start_service([{"tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}], tools=tools)
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="stuck"))
    await _until_tool_runs(call)
    drain = asyncio.create_task(svc.drain(grace=0.1))
    seen = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in call:
            seen.append(event)
    await drain
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    run_id = seen[-1].run_id
    assert seen[-1].error.retryable and seen[-1].error.code == "UNAVAILABLE"
    assert f"run {run_id} was interrupted: the server is shutting down" in seen[-1].error.message
    assert tools["sleep"].cancelled == 1  # type: ignore[attr-defined]


async def test_metadata_size_limits(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(limits={"max_metadata_bytes": 100, "max_metadata_value_bytes": 40})
    channel = channel_to(svc)
    for metadata, message in [
        ({"k": "v" * 41}, "metadata entry 'k' is 41 bytes; keys and values may have at most 40 bytes"),
        ({f"k{i}": "v" * 30 for i in range(4)}, "metadata is 128 bytes; the limit is 100 bytes"),
    ]:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await run_events(channel, metadata=metadata)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and info.value.details() == message


async def test_a_quiet_stream_survives_a_client_that_pings(start_service: Any) -> None:
    """A caller pinging every second on a stream that stays quiet for 3.5 s (a tool call): with grpc's server
    defaults (a ping at most every 5 minutes without data, 2 strikes) the connection was closed after about 3 s with
    UNAVAILABLE "too many pings". The allowed interval is lowered here so that a short test shows it."""
    svc = await start_service(
        [{"tool_calls": [{"name": "sleep", "input": {"seconds": 3.5}}]}, {"text": "done"}],
        keepalive={"min_client_ping_interval_s": 0.5},
    )
    options = [
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
    ]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}", options=options) as channel:
        events = await run_events(channel, message="wait quietly")
    assert events[-1].final_response.text == "done"


async def test_request_headers_over_the_limit_are_refused_every_time(start_service: Any, channel_to: Any) -> None:
    """`limits.max_header_bytes` is a fixed cut-off: grpc's soft limit alone refused headers of 1–1.25x the limit
    only some of the time."""
    svc = await start_service(limits={"max_header_bytes": 4096})
    channel = channel_to(svc)
    for size, expected in ((3000, None), (4400, grpc.StatusCode.RESOURCE_EXHAUSTED)):
        for _ in range(8):
            call = stub(channel).RunAgent(pb.RunAgentRequest(message="hi"), metadata=[("x-padding", "p" * size)])
            try:
                async for _event in call:
                    pass
                code = None
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
            assert code == expected, f"{size} bytes of headers"
