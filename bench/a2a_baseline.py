"""The A2A SDK's own gRPC server playing the benchmark's timeline: `a2a-sdk[grpc]`'s `DefaultRequestHandler` and
`GrpcHandler` in front of an `AgentExecutor` that sends one A2A event per step of `bench.workload.timeline`, with
the same sleeps. It runs from its own venv (`make a2a-venv`, `.a2a-venv/`): the SDK pins its own grpc and protobuf,
and the service's venv must not depend on it.

    .a2a-venv/bin/python -m bench.a2a_baseline serve --port P --workload JSON
    .a2a-venv/bin/python -m bench.a2a_baseline request FILE   # the gRPC-framed request h2load posts
    .a2a-venv/bin/python -m bench.a2a_baseline validate HOST:PORT FILE [DEADLINE]  # one stream's events, as JSON

The steps map onto A2A's streaming events: the run's start is the `Task` (state submitted), text deltas and tool
call pieces are artifact chunks (`append`), the tool result and usage are status updates (working), and the final
response is the `completed` status. `validate` prints each event as the benchmark's (kind, text) pair, taken from
the event's metadata `kind`, so that `bench.h2load.check` judges it as it judges the other systems.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import struct
import sys
from pathlib import Path

import grpc
from a2a.server.agent_execution import AgentExecutor, RequestContext
from a2a.server.events import EventQueue
from a2a.server.request_handlers import DefaultRequestHandler, GrpcHandler
from a2a.server.tasks import InMemoryTaskStore, TaskUpdater
from a2a.types import (
    AgentCapabilities,
    AgentCard,
    Message,
    Part,
    Role,
    SendMessageRequest,
    StreamResponse,
    Task,
    TaskState,
    TaskStatus,
    a2a_pb2_grpc,
)

from bench.serving import serve_until_stopped
from bench.workload import Step, timeline, workload_arg

METHOD = "/lf.a2a.v1.A2AService/SendStreamingMessage"
_ARTIFACT = {"text_delta", "tool_call_delta"}


class TimelineExecutor(AgentExecutor):
    """Sends the workload's steps as A2A events, sleeping where the workload sleeps."""

    def __init__(self, steps: list[Step]) -> None:
        self.steps = steps

    async def execute(self, context: RequestContext, event_queue: EventQueue) -> None:
        task_id, context_id = str(context.task_id), str(context.context_id)
        updater = TaskUpdater(event_queue, task_id, context_id)
        started: set[str] = set()  # artifacts whose first chunk went out: A2A appends only to an existing one
        for step in self.steps:
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            meta = {"kind": step.kind}
            if step.kind == "run_started":
                status = TaskStatus(state=TaskState.TASK_STATE_SUBMITTED)
                task = Task(id=task_id, context_id=context_id, status=status, metadata=meta)
                if context.message is not None:
                    task.history.append(context.message)
                await event_queue.enqueue_event(task)
            elif step.kind in _ARTIFACT:
                append = step.kind in started
                started.add(step.kind)
                await updater.add_artifact([Part(text=step.text)], artifact_id=step.kind, metadata=meta, append=append)
            elif step.kind == "final_response":
                await updater.update_status(TaskState.TASK_STATE_COMPLETED, message=_message("done"), metadata=meta)
            else:
                await updater.update_status(TaskState.TASK_STATE_WORKING, metadata=meta)

    async def cancel(self, context: RequestContext, event_queue: EventQueue) -> None:
        await TaskUpdater(event_queue, str(context.task_id), str(context.context_id)).cancel()


def _message(text: str) -> Message:
    return Message(message_id="bench", role=Role.ROLE_AGENT, parts=[Part(text=text)])


def request_bytes() -> bytes:
    """The `SendMessageRequest` every stream posts, gRPC-framed (flag byte, 4-byte big-endian length)."""
    message = Message(message_id="bench-request", role=Role.ROLE_USER, parts=[Part(text="hello")])
    raw = SendMessageRequest(message=message).SerializeToString()
    return struct.pack(">BI", 0, len(raw)) + raw


async def serve(port: int, steps: list[Step]) -> None:
    card = AgentCard(
        name="bench",
        description="plays the benchmark's timeline",
        version="1",
        capabilities=AgentCapabilities(streaming=True),
        default_input_modes=["text/plain"],
        default_output_modes=["text/plain"],
    )
    handler = DefaultRequestHandler(
        agent_executor=TimelineExecutor(steps), task_store=InMemoryTaskStore(), agent_card=card
    )
    # the same queue for calls not yet taken up as the service and the bare server (`pending_rpc_options`)
    options = [
        ("grpc.so_reuseport", 0),
        ("grpc.max_pending_requests", 15_000),
        ("grpc.max_pending_requests_hard_limit", 15_000),
        ("grpc.server_max_unrequested_time_in_server", 60),
    ]
    server = grpc.aio.server(options=options)
    a2a_pb2_grpc.add_A2AServiceServicer_to_server(GrpcHandler(handler), server)
    await serve_until_stopped(server, port)


def _kind_text(event: StreamResponse) -> tuple[str, str]:
    which = event.WhichOneof("payload")
    body = getattr(event, str(which))
    meta = body.artifact.metadata if which == "artifact_update" else body.metadata
    kind = meta["kind"] if "kind" in meta else str(which)
    if which == "artifact_update" and kind == "text_delta":
        return kind, "".join(p.text for p in body.artifact.parts)
    return kind, ""


def validate(target: str, body: bytes, deadline: float) -> dict[str, object]:
    """One stream of the request bytes h2load posts: its status, its (kind, text) events, its body bytes."""
    events, size, status = [], 0, "OK"
    with grpc.insecure_channel(target) as channel:
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        try:
            for raw in call(body[5:], timeout=deadline):
                size += 5 + len(raw)
                events.append(_kind_text(StreamResponse.FromString(raw)))
        except grpc.RpcError as exc:
            status = exc.code().name
    return {"status": status, "events": events, "body_bytes": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    serve_p = sub.add_parser("serve")
    serve_p.add_argument("--port", type=int, required=True)
    serve_p.add_argument("--workload", type=workload_arg, required=True)
    request_p = sub.add_parser("request")
    request_p.add_argument("file", type=Path)
    validate_p = sub.add_parser("validate")
    validate_p.add_argument("target")
    validate_p.add_argument("file", type=Path)
    validate_p.add_argument("deadline", type=float, nargs="?", default=30.0)
    args = parser.parse_args()
    if args.command == "serve":
        asyncio.run(serve(args.port, timeline(args.workload)))
    elif args.command == "request":
        args.file.parent.mkdir(parents=True, exist_ok=True)
        args.file.write_bytes(request_bytes())
    else:
        json.dump(validate(args.target, args.file.read_bytes(), args.deadline), sys.stdout)


if __name__ == "__main__":
    main()
