"""`limits.accept_ahead` (service/rpc/accept.py): more requests for new calls kept outstanding with grpc, so that a
burst is taken up several calls per turn of the event loop. What it must keep: every call served as grpc would serve
it (status, events, interceptors), the requests re-armed after each call, and nothing left running after a stop."""

from __future__ import annotations

import asyncio
import gc
import logging
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.v1 import agent_pb2 as pb
from conftest import run_events, stub
from service.rpc import accept
from service.rpc.server import SERVICE_NAME

METHODS = len(pb.DESCRIPTOR.services_by_name["AgentService"].methods)


def test_the_pinned_grpcio_has_what_accept_ahead_uses() -> None:
    # a grpcio upgrade that changes grpc's private pieces must fail here, not quietly serve one call per turn
    assert accept.available()


async def test_a_burst_of_calls_is_served_through_the_extra_requests(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(limits={"accept_ahead": 4})
    assert svc.accept.outstanding == 4 * METHODS
    channel = channel_to(svc)
    runs = [run_events(channel, message=f"burst {i}") for i in range(60)]
    tools = [stub(channel).ListTools(pb.ListToolsRequest()) for _ in range(20)]
    results = await asyncio.gather(*runs, *tools)
    for events in results[:60]:
        assert events[0].WhichOneof("event") == "run_started"
        assert events[-1].WhichOneof("event") == "final_response"
        assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert all(r.tools for r in results[60:])
    # most calls found one of the 4 extra requests rather than grpc's one; each was asked for again
    assert svc.accept.taken > 40
    assert svc.accept.outstanding == 4 * METHODS


async def test_refusals_keep_their_status_through_the_extra_requests(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(limits={"accept_ahead": 4})
    calls = [stub(channel_to(svc)).GetRun(pb.GetRunRequest(run_id="run_missing")) for _ in range(12)]
    errors = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(e, grpc.aio.AioRpcError) for e in errors)
    assert {e.code() for e in errors} == {grpc.StatusCode.NOT_FOUND}
    assert svc.accept.taken > 0


async def test_stopping_the_server_ends_every_request_loop(
    start_service: Any, channel_to: Any, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await start_service(limits={"accept_ahead": 4})
    await run_events(channel_to(svc))
    await svc.server.stop(0)
    await asyncio.wait_for(svc.accept.stop(), 2)
    assert svc.accept.outstanding == 0
    loops = [t for t in asyncio.all_tasks() if t.get_name().startswith("accept /")]
    assert loops == []
    assert not [r for r in caplog.records if r.name == accept.__name__ and r.levelno >= logging.WARNING]


async def test_closing_before_the_server_stops_leaves_the_requests_to_its_stop(start_service: Any) -> None:
    svc = await start_service(limits={"accept_ahead": 4})
    await svc.close()  # the server still runs (a test, or a program embedding the service, may close it first)
    # not cancelled: the core holds each request's state until it answers, and freeing it crashed the collector
    assert svc.accept.outstanding == 4 * METHODS
    await svc.server.stop(0)  # the core fails every outstanding request: each loop ends by itself
    await asyncio.wait_for(svc.accept.stop(), 2)
    assert svc.accept.outstanding == 0
    gc.collect()


async def test_zero_leaves_grpc_alone(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(limits={"accept_ahead": 0})
    assert svc.accept.outstanding == 0
    events = await run_events(channel_to(svc))
    assert events[-1].WhichOneof("event") == "final_response"
    assert svc.accept.taken == 0


async def test_calls_through_the_extra_requests_get_tracing_interceptor_spans(
    start_service: Any, channel_to: Any, spans: InMemorySpanExporter
) -> None:
    svc = await start_service(limits={"accept_ahead": 4})
    channel = channel_to(svc)
    await asyncio.gather(*(run_events(channel, message=f"traced {i}") for i in range(20)))
    assert svc.accept.taken > 0
    for _ in range(100):  # the interceptor ends each span just after the call's status
        rpc = [s for s in spans.get_finished_spans() if s.name == f"/{SERVICE_NAME}/RunAgent"]
        if len(rpc) == 20:
            break
        await asyncio.sleep(0.01)
    assert len(rpc) == 20 and all(s.kind.name == "SERVER" for s in rpc)
