"""The gRPC servicer: validates requests, maps domain events to protobuf, and maps run failures to status codes.

It is thin on purpose: the agent loop lives in `service/loop.py` and knows nothing of gRPC.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
from google.protobuf import duration_pb2, json_format, struct_pb2, timestamp_pb2

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service import events as ev
from service import telemetry
from service.config import Config
from service.loop import AgentLoop, RunSpec
from tools.base import Tool

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request cannot run as sent; the message says what to change."""


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self, loop: AgentLoop, tools: Mapping[str, Tool[Any]], config: Config) -> None:
        self.loop = loop
        self.tools = tools
        self.config = config
        self.draining = False
        self.active: set[asyncio.Task[Any]] = set()
        self._interrupted: set[asyncio.Task[Any]] = set()

    async def interrupt(self, runs: set[asyncio.Task[Any]], wait_s: float = 5.0) -> None:
        """The service's own cancel (shutdown), told apart from a caller's: each run ends with a retryable
        `error` event naming its run id and UNAVAILABLE, after its model stream and tools were cancelled."""
        self._interrupted |= runs
        for task in runs:
            task.cancel()
        await asyncio.wait(runs, timeout=wait_s)

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(
            tools=[
                pb.ToolInfo(
                    name=t.name,
                    description=t.description,
                    input_schema=_struct(t.input_schema()),
                    streaming=t.streaming,
                )
                for t in self.tools.values()
            ]
        )

    async def RunAgent(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        received = time.perf_counter()
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        run_id = f"run_{uuid.uuid4().hex[:24]}"
        try:
            spec = self.validate(request, run_id)
        except InvalidRequest as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("run started", extra={"run_id": run_id, "model": spec.model, "metadata": dict(spec.metadata)})
        task = asyncio.current_task()
        assert task is not None
        self.active.add(task)
        telemetry.ACTIVE_RUNS.inc()
        outcome = "CANCELLED"
        seq = 0
        failure: ev.RunFailed | None = None
        try:
            async for event in self.loop.run(spec):
                seq += 1
                if seq == 1:
                    telemetry.FIRST_EVENT.observe(time.perf_counter() - received)
                message = to_proto(event, run_id, seq)
                telemetry.EVENTS.labels(message.WhichOneof("event")).inc()
                yield message
                if isinstance(event, ev.RunFailed):
                    failure = event
            outcome = failure.code if failure else "OK"
        except Exception:
            # A bug, not a run failure: the caller gets INTERNAL with the run id to quote; the log has the traceback.
            log.exception("run crashed", extra={"run_id": run_id})
            outcome = "INTERNAL"
            failure = ev.RunFailed(code="INTERNAL", message=f"internal error in run {run_id}", retryable=False)
            seq += 1
            yield to_proto(failure, run_id, seq)
        except asyncio.CancelledError:
            if task not in self._interrupted:
                remaining = context.time_remaining()
                outcome = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
                raise
            task.uncancel()
            outcome = "UNAVAILABLE"
            failure = ev.RunFailed(
                code="UNAVAILABLE",
                message=f"run {run_id} was interrupted: the server is shutting down; retry on another replica",
                retryable=True,
            )
            seq += 1
            yield to_proto(failure, run_id, seq)
        finally:
            self._interrupted.discard(task)
            self.active.discard(task)
            telemetry.ACTIVE_RUNS.dec()
            telemetry.RUNS.labels(outcome).inc()
            log.info("run ended", extra={"run_id": run_id, "outcome": outcome, "events": seq})
        if failure is not None:
            await context.abort(grpc.StatusCode[failure.code], failure.message)

    def validate(self, request: pb.RunAgentRequest, run_id: str) -> RunSpec:
        limits = self.config.limits
        if not request.message.strip():
            raise InvalidRequest("message must not be empty: put the user's question in `message`")
        size = len(request.message.encode())
        if size > limits.max_message_bytes:
            raise InvalidRequest(f"message is {size} bytes; the limit is {limits.max_message_bytes} bytes")
        if request.HasField("system") and len(request.system.encode()) > limits.max_system_bytes:
            raise InvalidRequest(f"system is longer than {limits.max_system_bytes} bytes")
        unknown = [name for name in request.tools if name not in self.tools]
        if unknown:
            raise InvalidRequest(
                f"unknown tool(s): {', '.join(unknown)}; available: {', '.join(self.tools)} (see ListTools)"
            )
        if len(set(request.tools)) != len(request.tools):
            raise InvalidRequest("tools lists a name twice")
        max_turns = request.max_turns if request.HasField("max_turns") else limits.default_max_turns
        if not 1 <= max_turns <= limits.max_turns:
            raise InvalidRequest(f"max_turns must be between 1 and {limits.max_turns}, got {max_turns}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.config.model.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if len(request.metadata) > limits.max_metadata_entries:
            raise InvalidRequest(
                f"metadata has {len(request.metadata)} entries; the limit is {limits.max_metadata_entries}"
            )
        return RunSpec(
            run_id=run_id,
            message=request.message,
            model=request.model or self.loop.model.default_model,
            system=request.system if request.HasField("system") else self.config.system_prompt,
            max_turns=max_turns,
            max_tokens=max_tokens,
            tools=tuple(request.tools) or tuple(self.tools),
            metadata=dict(request.metadata),
        )


def to_proto(event: ev.Event, run_id: str, seq: int) -> pb.AgentEvent:
    """The one place where domain events become protobuf."""
    out = pb.AgentEvent(run_id=run_id, seq=seq, time=_now())
    match event:
        case ev.RunStarted():
            out.run_started.CopyFrom(pb.RunStarted(model=event.model, tools=event.tools, max_turns=event.max_turns))
        case ev.Thinking():
            out.thinking.CopyFrom(pb.Thinking(turn=event.turn, text=event.text))
        case ev.TextDelta():
            out.text_delta.CopyFrom(pb.TextDelta(turn=event.turn, text=event.text))
        case ev.ToolCall():
            out.tool_call.CopyFrom(pb.ToolCall(turn=event.turn, call_id=event.call_id, name=event.name))
        case ev.ToolCallDelta():
            out.tool_call_delta.CopyFrom(pb.ToolCallDelta(call_id=event.call_id, partial_json=event.partial_json))
        case ev.ToolCallReady():
            out.tool_call_ready.CopyFrom(
                pb.ToolCallReady(call_id=event.call_id, name=event.name, input=_struct(event.input))
            )
        case ev.ToolResultChunk():
            out.tool_result_chunk.CopyFrom(
                pb.ToolResultChunk(call_id=event.call_id, index=event.index, total=event.total, data=_value(event.data))
            )
        case ev.ToolResult():
            out.tool_result.CopyFrom(
                pb.ToolResult(
                    call_id=event.call_id,
                    name=event.name,
                    status=_TOOL_STATUS[event.status],
                    duration=_duration(event.duration_s),
                    data=_value(event.data) if event.ok else None,
                    error=event.error,
                    attempts=event.attempts,
                    cache_hit=event.cache_hit,
                    answered_by=event.answered_by,
                )
            )
        case ev.ToolRetry():
            out.tool_retry.CopyFrom(
                pb.ToolRetry(
                    call_id=event.call_id,
                    attempt=event.attempt,
                    max_attempts=event.max_attempts,
                    wait=_duration(event.wait_s),
                    error=event.error,
                )
            )
        case ev.ToolFallback():
            out.tool_fallback.CopyFrom(
                pb.ToolFallback(
                    call_id=event.call_id, primary=event.primary, fallback=event.fallback, reason=event.reason
                )
            )
        case ev.ExecutionFailed():
            out.execution_failed.CopyFrom(
                pb.ExecutionFailed(
                    execution_id=event.execution_id, call_id=event.call_id, tool=event.tool, message=event.message
                )
            )
        case ev.Usage():
            out.usage.CopyFrom(
                pb.Usage(
                    turn=event.turn,
                    input_tokens=event.input_tokens,
                    output_tokens=event.output_tokens,
                    total_input_tokens=event.total_input_tokens,
                    total_output_tokens=event.total_output_tokens,
                )
            )
        case ev.FinalResponse():
            out.final_response.CopyFrom(
                pb.FinalResponse(
                    text=event.text,
                    stop_reason=event.stop_reason,
                    turns=event.turns,
                    tool_calls=event.tool_calls,
                    input_tokens=event.input_tokens,
                    output_tokens=event.output_tokens,
                    duration=_duration(event.duration_s),
                )
            )
        case ev.RunFailed():
            out.error.CopyFrom(pb.Error(code=event.code, message=event.message, retryable=event.retryable))
        case _:
            raise TypeError(f"no protobuf mapping for {type(event).__name__}")
    return out


_TOOL_STATUS = {status: pb.ToolStatus.Value(f"TOOL_STATUS_{status.name}") for status in ev.ToolStatus}


def _now() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return ts


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(value)
    return s


def _value(value: Any) -> struct_pb2.Value:
    return json_format.ParseDict(value, struct_pb2.Value())
