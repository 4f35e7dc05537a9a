"""No reference cycles left behind by a run, however it ends. An exception keeps its traceback, the traceback keeps
the frames it passed through, and a frame that keeps the exception (in a local) closes a cycle that only the cyclic
collector can free. Every cancelled stream or failed turn would then feed the collector, whose passes stop every
call in flight (with the collector off, a burst of 100 quiet streams cost about 75 µs less CPU per call; see
docs/performance-log.md).

Each case runs one request over real gRPC to its end and lists the frames of the service's own code that only the
collector could free."""

from __future__ import annotations

import asyncio
import gc
import types
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

import service
import tools
from agent.v1 import agent_pb2 as pb
from conftest import stub
from fake_tools import all_tools

OURS = tuple(str(Path(p.__file__).parent) + "/" for p in (service, tools))
SLOW_TOOL = [{"text": "Working.", "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}, {"text": "never"}]


async def cyclic_frames_of_ours(body: Callable[[], Awaitable[None]]) -> list[str]:
    """Run `body`, then collect: the frames of our code among what only the collector freed."""
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await body()
        await asyncio.sleep(0.05)  # the server's handler and the run's task finish their last steps
        gc.collect()
        return sorted(
            {
                f"{Path(o.f_code.co_filename).name}:{o.f_code.co_name}"
                for o in gc.garbage
                if isinstance(o, types.FrameType) and o.f_code.co_filename.startswith(OURS)
            }
        )
    finally:
        gc.set_debug(0)
        gc.garbage.clear()


async def drain(call: Any) -> None:
    try:
        async for _ in call:
            pass
    except grpc.aio.AioRpcError:
        pass


async def first_event_run_id(call: Any) -> str:
    async for event in call:  # the iterator stays open: `drain` goes on from here
        return str(event.run_id)
    raise AssertionError("no event")


async def until_tool_runs(call: Any) -> str:
    async for event in call:
        if event.HasField("tool_call_ready"):
            return str(event.run_id)
    raise AssertionError("no tool_call_ready")


CASES: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "completed, with a tool call": ([], {}),
    "a tool that fails": ([{"tool_calls": [{"name": "fail", "input": {"text": "x"}}]}, {"text": "done"}], {}),
    "a tool that raises": ([{"tool_calls": [{"name": "buggy", "input": {"text": "x"}}]}, {"text": "done"}], {}),
    "a tool that times out": (
        [{"tool_calls": [{"name": "hang", "input": {"text": "x"}}]}, {"text": "done"}],
        {"limits": {"tool_timeout_s": 0.1}},
    ),
    "the model fails every attempt": (
        [{"text": "never", "fail": {"status": 529, "times": 10}}],
        {"model": {"retry": {"attempts": 2, "initial_backoff_s": 0.01}}},
    ),
}


async def test_a_failed_unary_run_and_a_refused_request_leave_no_cycles(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(
        [{"text": "never", "fail": {"status": 529, "times": 10}}], model={"retry": {"attempts": 1}}
    )
    channel = channel_to(svc)

    async def body() -> None:
        for request in (pb.RunAgentRequest(message="go"), pb.RunAgentRequest(message="")):
            with pytest.raises(grpc.aio.AioRpcError):
                await stub(channel).RunAgentUnary(request)
            await drain(stub(channel).RunAgent(request))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub(channel).GetRun(pb.GetRunRequest(run_id="run_unknown"))
        with pytest.raises(grpc.aio.AioRpcError):  # refused by the interceptors: undecodable, then unauthenticated
            await channel.unary_unary("/agent.v1.AgentService/GetRun")(b"\xff\xff")
        with pytest.raises(grpc.aio.AioRpcError):
            await stub(channel).GetRun(pb.GetRunRequest(run_id="x"), metadata=[("authorization", "Bearer wrong")])

    await body()  # connected and warm
    frames = await cyclic_frames_of_ours(body)
    assert frames == [], frames


@pytest.mark.parametrize("case", list(CASES))
async def test_a_run_that_ends_by_itself_leaves_no_cycles(start_service: Any, channel_to: Any, case: str) -> None:
    turns, config = CASES[case]
    svc = await start_service(turns or None, tools=all_tools(), **config)
    channel = channel_to(svc)
    await drain(stub(channel).RunAgent(pb.RunAgentRequest(message="go")))  # connected and warm

    async def body() -> None:
        await drain(stub(channel).RunAgent(pb.RunAgentRequest(message="go")))

    frames = await cyclic_frames_of_ours(body)
    assert frames == [], frames


@pytest.mark.parametrize("during", ["model turn", "tool call"])
@pytest.mark.parametrize("how", ["disconnect", "CancelRun", "deadline"])
async def test_a_stopped_run_leaves_no_cycles(start_service: Any, channel_to: Any, how: str, during: str) -> None:
    if during == "tool call":
        svc = await start_service(SLOW_TOOL, tools=all_tools())
    else:  # the model's first token would come after 30 s
        svc = await start_service(SLOW_TOOL, tools=all_tools(), model={"pacing": {"first_token_ms": 30_000}})
    channel = channel_to(svc)
    await drain(stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=0.5))  # connected and warm

    async def body() -> None:
        if how == "deadline":
            await drain(stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=0.5))
            return
        call = stub(channel).RunAgent(pb.RunAgentRequest(message="go"))
        if during == "tool call":
            run_id = await until_tool_runs(call)
        else:
            run_id = await first_event_run_id(call)
            await asyncio.sleep(0.05)  # the driver is in the model turn, waiting for the first token
        if how == "disconnect":
            call.cancel()
        else:
            await stub(channel).CancelRun(pb.CancelRunRequest(run_id=run_id))
            await drain(call)
        task = svc.registry.get(run_id).task
        assert task is not None
        await asyncio.wait_for(asyncio.shield(task), 5)

    frames = await cyclic_frames_of_ours(body)
    assert frames == [], frames
