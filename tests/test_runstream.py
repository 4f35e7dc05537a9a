"""A run's gRPC stream is one async generator from grpc to the run's log (service/rpc/runstream.py): each layer more
would cost every event a hop. Held here by counting the generators a real call starts, and by the interceptors'
checks running inside the stream rather than around it."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from conftest import StartService, run_events_of, stub
from service.errors import InvalidRequest
from service.rpc.interceptors import wrap_handler

SERVICE = Path(__file__).resolve().parent.parent / "service"


async def test_a_run_agent_call_has_one_generator_between_grpc_and_the_log(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    svc = await start_service()
    client = stub(channel_to(svc))
    await run_events_of(client.RunAgent(pb.RunAgentRequest(message="warm up")))
    started: list[str] = []
    hooks = sys.get_asyncgen_hooks()

    def firstiter(gen: Any) -> None:
        code = gen.ag_code
        path = Path(code.co_filename)
        if path.is_relative_to(SERVICE):
            started.append(f"{path.relative_to(SERVICE)}:{code.co_name}")
        if hooks.firstiter is not None:
            hooks.firstiter(gen)

    sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=hooks.finalizer)
    try:
        events = await run_events_of(client.RunAgent(pb.RunAgentRequest(message="hello")))
    finally:
        sys.set_asyncgen_hooks(*hooks)
    assert events[-1].WhichOneof("event") == "final_response"
    # the stream's side: the gRPC layer and the run's log; the run's own side (the loop, the model) is not counted
    stream_side = [name for name in started if name.startswith(("rpc/", "run.py"))]
    assert stream_side == ["rpc/runstream.py:stream"]


class _Context:
    def __init__(self) -> None:
        self.code: grpc.StatusCode | None = None
        self.details = ""

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, metadata: tuple[tuple[str, bytes], ...]) -> None:
        self.trailers = metadata

    def time_remaining(self) -> float | None:
        return None


async def test_interceptor_checks_run_inside_the_run_stream_outer_first(start_service: StartService) -> None:
    svc = await start_service()
    seen: list[str] = []

    def check(name: str, refuse: bool) -> Any:
        def run(request: Any, context: Any) -> InvalidRequest | None:
            seen.append(name)
            return InvalidRequest(f"refused by {name}") if refuse else None

        return run

    handler = grpc.unary_stream_rpc_method_handler(
        svc.servicer.RunAgent, pb.RunAgentRequest.FromString, pb.AgentEvent.SerializeToString
    )
    inner = wrap_handler(handler, check("inner", refuse=True))
    outer = wrap_handler(inner, check("outer", refuse=False))
    # no wrapper generator: the servicer's own stream, bound to it, with both checks
    assert outer.unary_stream.__self__ is svc.servicer
    assert outer.unary_stream.__code__.co_filename.endswith("runstream.py")
    assert outer.unary_stream._guarded[0] == svc.servicer.RunAgent
    context = _Context()
    events = [e async for e in outer.unary_stream(pb.RunAgentRequest(message="hi"), context)]
    assert (events, seen) == ([], ["outer", "inner"])
    assert (context.code, context.details) == (grpc.StatusCode.INVALID_ARGUMENT, "refused by inner")
    assert not svc.registry.runs  # refused before any run was opened

    seen.clear()
    passing = wrap_handler(handler, check("only", refuse=False))
    events = [e async for e in passing.unary_stream(pb.RunAgentRequest(message="hi"), _Context())]
    assert seen == ["only"] and events[-1].WhichOneof("event") == "final_response"
