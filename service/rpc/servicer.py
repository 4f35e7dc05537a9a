"""The gRPC servicer: validates requests, starts runs in the registry, streams their logs and maps run failures to
status codes. It is thin on purpose: runs live in `service/runs.py`, the loop in `service/loop.py`.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service import events as ev
from service import telemetry
from service.callers import Caller, CallerLimits, current_caller
from service.config import Config, Limits
from service.deadline import run_margin_s
from service.errors import RunCancelled
from service.loop import RunSpec
from service.models.base import ToolSpec
from service.rpc.convert import event_kind, run_result, run_state, run_to_proto, struct, to_proto
from service.rpc.interceptors import refuse
from service.runs import IdempotencyConflict, NotFound, QueueFull, Run, RunRegistry, RunState, SubscriberTooSlow
from tools.base import Tool

log = logging.getLogger(__name__)


class InvalidRequest(ValueError):
    """The request cannot run as sent; the message says what to change."""


class PermissionDenied(Exception):
    """The caller may not do this (a tool outside its rights)."""


class CallerLimited(Exception):
    """The caller is at one of its limits (concurrent runs, runs per minute)."""


class ToolUnavailable(Exception):
    """A tool the request names cannot work on this server (`Tool.unavailable` says why)."""


# The one map from the service's exceptions to gRPC status codes.
_STATUS: dict[type[Exception], grpc.StatusCode] = {
    InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    QueueFull: grpc.StatusCode.RESOURCE_EXHAUSTED,
    IdempotencyConflict: grpc.StatusCode.ALREADY_EXISTS,
    SubscriberTooSlow: grpc.StatusCode.RESOURCE_EXHAUSTED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    CallerLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ToolUnavailable: grpc.StatusCode.FAILED_PRECONDITION,
}


class _Abort(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        self.message = message


class _Mapped:
    """`with _mapped:` turns the service's exceptions into `_Abort` with their status code. A class rather than a
    `@contextmanager`, which would cost every run start a generator."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if isinstance(exc, _MAPPED):
            raise _Abort(_STATUS[type(exc)], str(exc)) from exc


_MAPPED = tuple(_STATUS)
_ON_DISCONNECT = frozenset(pb.RunAgentRequest.OnDisconnect.values())
_CANCEL_MODES = frozenset(pb.CancelRunRequest.Mode.values())
_mapped = _Mapped()  # stateless: one instance serves every call


class AgentServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        registry: RunRegistry,
        tools: Mapping[str, Tool[Any]],
        config: Config,
        *,
        anonymous: Caller,
        caller_limits: CallerLimits,
        tool_specs: Callable[[Sequence[str]], list[ToolSpec]],
        default_model: str,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        """`anonymous`: the caller of calls that name none (auth off). `tool_specs`: the tools as the model sees them,
        by name; `default_model`: the model of a request that names none."""
        self.registry = registry
        self.clock = clock  # for the time to first event
        # a tool that cannot work here is left out of ListTools and of a run's default tools; a run naming it fails
        self.tools = {name: tool for name, tool in tools.items() if not tool.unavailable}
        self.unavailable = {name: tool.unavailable for name, tool in tools.items() if tool.unavailable}
        self.config = config
        self.draining = False
        self.streams: set[asyncio.Task[Any]] = set()
        self.anonymous = anonymous
        self.caller_limits = caller_limits
        self.tool_specs = tool_specs
        self.default_model = default_model

    def caller(self) -> Caller:
        """This call's caller, as the auth interceptor identified it (anonymous when auth is off)."""
        return current_caller() or self.anonymous

    def run_of(self, run_id: str) -> Run:
        """A run the caller may see: another caller's run is NOT_FOUND, as if it did not exist."""
        if not run_id:
            raise InvalidRequest("run_id is required: the id RunAgent's first event or SubmitRun returned")
        return self.registry.get(run_id, caller=self.caller().name)

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext) -> pb.ListToolsResponse:
        caller = self.caller()
        allowed = [name for name in self.tools if caller.may_use(name)]
        # the loop's specs: each tool's JSON Schema is generated once, not per call
        specs = self.tool_specs(allowed)
        return pb.ListToolsResponse(
            tools=[
                pb.ToolInfo(
                    name=spec.name,
                    description=spec.description,
                    input_schema=struct(spec.input_schema),
                    streaming=self.tools[spec.name].streaming,
                )
                for spec in specs
            ]
        )

    async def RunAgent(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        received = self.clock()
        try:
            run, created = self._start(request, context, background=False)
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return
        owner = created and request.on_disconnect != pb.RunAgentRequest.CONTINUE
        async for event in self._stream(run, 0, context, owner=owner, received=received):
            yield event

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        try:
            with _mapped:
                run = self.run_of(request.run_id)
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return
        logged = len(run.log)
        if request.after_seq > logged:  # no caller can have seen a seq not logged yet, live run or ended
            where = f"ended at seq {logged}" if run.finished else f"is running, at seq {logged}"
            refuse(context, grpc.StatusCode.OUT_OF_RANGE, f"after_seq={request.after_seq}, but run {run.id} {where}")
            return
        async for event in self._stream(run, request.after_seq, context, owner=False):
            yield event

    async def CancelRun(
        self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelRunResponse | None:
        try:
            with _mapped:
                if request.mode not in _CANCEL_MODES:
                    raise InvalidRequest(f"unknown mode {request.mode}: IMMEDIATE or AFTER_TURN")
                run = self.run_of(request.run_id)
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return None
        if run.state is RunState.CANCELLED:  # idempotent: cancelling a cancelled run is a success
            return pb.CancelRunResponse(run_id=run.id, state=run_state(run.state))
        if run.finished:
            message = f"run {run.id} already ended ({run.state.value}); nothing to cancel"
            refuse(context, grpc.StatusCode.FAILED_PRECONDITION, message)
            return None
        after_turn = request.mode == pb.CancelRunRequest.AFTER_TURN
        self.registry.cancel(run, after_turn=after_turn)
        if not after_turn and run.task is not None:
            # usually done within milliseconds: answer with the final state when it is there
            await asyncio.wait([run.task], timeout=1.0)
        return pb.CancelRunResponse(run_id=run.id, state=run_state(run.state))

    async def SubmitRun(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitRunResponse | None:
        try:
            run, _ = self._start(request, context, background=True)
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return None
        return pb.SubmitRunResponse(run_id=run.id, state=run_state(run.state))

    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.Run | None:
        try:
            with _mapped:
                return run_to_proto(self.run_of(request.run_id))
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return None

    async def RunAgentUnary(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunResult | None:
        try:
            run, created = self._start(request, context, background=False)
        except _Abort as exc:
            refuse(context, exc.code, exc.message)
            return None
        assert run.task is not None
        try:
            await asyncio.shield(run.task)
        except asyncio.CancelledError:
            # as for the stream: CONTINUE leaves the run going; the same idempotency key attaches to it again
            if created and not run.finished and request.on_disconnect != pb.RunAgentRequest.CONTINUE:
                run.control.stop_now(RunCancelled("the caller cancelled or disconnected"))
            raise
        if _ended_with_failure(run, context):
            return None
        return run_result(run)

    def _start(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext, *, background: bool
    ) -> tuple[Run, bool]:
        if self.draining:
            raise _Abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry on another replica")
        run_id = f"run_{secrets.token_hex(12)}"  # 96 random bits; uuid4() costs 5x more
        caller = self.caller()
        key = request.idempotency_key
        digest = fingerprint(request) if key else ""  # hashing the request costs; only a key needs it
        with _mapped:
            spec = self.validate(request, run_id, caller)
            existing = self.registry.find(caller.name, key, digest)
            if existing is not None:
                return existing, False
            refused = self.caller_limits.admit(caller)
            if refused is not None:
                raise CallerLimited(refused)
            deadline = None
            remaining = context.time_remaining()
            # a CONTINUE run outlives its call, and so the call's deadline: only `runs.max_run_s` bounds it
            if remaining is not None and not background and request.on_disconnect != pb.RunAgentRequest.CONTINUE:
                margin = run_margin_s(remaining, self.config.runs.deadline_margin_s)
                deadline = asyncio.get_running_loop().time() + remaining - margin
            run, created = self.registry.start(
                spec,
                caller=caller.name,
                key=key,
                fingerprint=digest,
                deadline=deadline,
                background=background,
            )
        if created and run.task is not None:
            self.caller_limits.started(caller)
            run.task.add_done_callback(lambda _: self.caller_limits.ended(caller))
        return run, created

    async def _stream(
        self,
        run: Run,
        after_seq: int,
        context: grpc.aio.ServicerContext,
        *,
        owner: bool,
        received: float | None = None,
    ) -> AsyncIterator[pb.AgentEvent]:
        """Send the run's log from `after_seq`, live, then end with the run's status. `owner`: the caller's
        disconnect cancels the run (on_disconnect=CANCEL)."""
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        runs = self.config.runs
        dropped: SubscriberTooSlow | None = None
        sent = _SentCounts()
        try:
            async for entry in run.follow(
                after_seq, coalesce_lag=runs.subscriber_coalesce_lag, max_lag=runs.subscriber_max_lag
            ):
                message = to_proto(entry.event, run.id, entry.seq, time_ns=entry.time_ns, first_seq=entry.first_seq)
                sent.add(type(entry.event))
                yield message
                if received is not None:  # grpc asks for the next message once it has sent this one
                    telemetry.FIRST_EVENT.observe(self.clock() - received)
                    received = None
        except SubscriberTooSlow as exc:
            log.warning("slow subscriber dropped", extra={"run_id": run.id, "last_seq": exc.last_seq})
            dropped = exc
        except BaseException as exc:
            # A disconnect lands as CancelledError while the stream waits for the run, and as GeneratorExit while
            # grpc waits to send a message this stream yielded (grpc then closes the generator, not the task). Any
            # other exception is a bug of ours that ends the call: nobody is left to read an owned run either.
            if owner and not run.finished:
                left = isinstance(exc, asyncio.CancelledError | GeneratorExit)
                why = "the caller cancelled or disconnected" if left else "the stream that started the run failed"
                run.control.stop_now(RunCancelled(why))
            raise
        finally:
            sent.flush()
            self.streams.discard(task)
        if dropped is not None:
            refuse(context, grpc.StatusCode.RESOURCE_EXHAUSTED, str(dropped))
            return
        _ended_with_failure(run, context)

    def validate(self, request: pb.RunAgentRequest, run_id: str, caller: Caller) -> RunSpec:
        limits = self.config.limits
        runs = self.config.runs
        if not request.message.strip():
            raise InvalidRequest("message must not be empty: put the user's question in `message`")
        size = len(request.message.encode())
        if size > limits.max_message_bytes:
            raise InvalidRequest(f"message is {size} bytes; the limit is {limits.max_message_bytes} bytes")
        if request.HasField("system") and len(request.system.encode()) > limits.max_system_bytes:
            raise InvalidRequest(f"system is longer than {limits.max_system_bytes} bytes")
        tools = list(request.tools)  # each access to a repeated field builds a new view: read it once
        down = sorted(set(tools) & self.unavailable.keys()) if self.unavailable else []
        if down:
            more = f" (so are {_some(down[1:])})" if len(down) > 1 else ""
            raise ToolUnavailable(f"tool {down[0]} is unavailable on this server: {self.unavailable[down[0]]}{more}")
        unknown = [name for name in tools if name not in self.tools]
        if unknown:
            # the caller's tools only, as ListTools lists them: the others' names are not for this caller to learn
            available = ", ".join(name for name in self.tools if caller.may_use(name)) or "none"
            raise InvalidRequest(f"unknown tool(s): {_some(unknown)}; available: {available} (see ListTools)")
        if len(set(tools)) != len(tools):
            twice = sorted(name for name, n in Counter(tools).items() if n > 1)  # linear: tools may be 100,000 long
            raise InvalidRequest(f"tools lists {_some(twice)} more than once")
        denied = [name for name in tools if not caller.may_use(name)]
        if denied:
            raise PermissionDenied(f"caller {caller.name} may not use tool(s): {_some(denied)}")
        max_turns = request.max_turns if request.HasField("max_turns") else limits.default_max_turns
        if not 1 <= max_turns <= limits.max_turns:
            raise InvalidRequest(f"max_turns must be between 1 and {limits.max_turns}, got {max_turns}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.config.model.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if request.on_disconnect not in _ON_DISCONNECT:
            raise InvalidRequest(f"unknown on_disconnect {request.on_disconnect}: CANCEL or CONTINUE")
        key_bytes = len(request.idempotency_key.encode())
        if key_bytes > limits.max_idempotency_key_bytes:
            raise InvalidRequest(
                f"idempotency_key is {key_bytes} bytes; the limit is {limits.max_idempotency_key_bytes} bytes"
            )
        model_bytes = len(request.model.encode())
        if model_bytes > limits.max_model_bytes:  # it goes into logs, spans and the model request: bounded
            raise InvalidRequest(
                f"model is {model_bytes} bytes; a model id has at most {limits.max_model_bytes} bytes "
                f"(leave it empty for the server's default)"
            )
        metadata = _checked_metadata(request, limits)
        return RunSpec(
            run_id=run_id,
            message=request.message,
            model=request.model or self.default_model,
            system=request.system if request.HasField("system") else self.config.system_prompt,
            max_turns=max_turns,
            max_tokens=max_tokens,
            tools=tuple(tools) or tuple(t for t in self.tools if caller.may_use(t)),
            # the authenticated caller, for logs, spans and audit records; it overrides a "caller" the request sent
            metadata={**metadata, "caller": caller.name},
            max_tool_calls=self._limit(request, "max_tool_calls", runs.max_tool_calls),
            max_output_tokens=self._limit(request, "max_output_tokens", runs.max_output_tokens),
        )

    @staticmethod
    def _limit(request: pb.RunAgentRequest, name: str, maximum: int) -> int:
        if not request.HasField(name):
            return maximum
        value = int(getattr(request, name))
        if not 1 <= value <= maximum:
            raise InvalidRequest(f"{name} must be between 1 and {maximum}, got {value}")
        return value


def _some(names: list[str], shown: int = 10) -> str:
    """The first names, for a message that goes back in the call's trailers: grpc clients refuse trailers of more
    than 8 KiB by default, and a request may list thousands of names."""
    text = ", ".join(name[:100] for name in names[:shown])
    return text if len(names) <= shown else f"{text} and {len(names) - shown} more"


def _checked_metadata(request: pb.RunAgentRequest, limits: Limits) -> dict[str, str]:
    metadata = dict(request.metadata)
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidRequest(f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}")
    total = 0
    for key, value in metadata.items():
        if not key:
            raise InvalidRequest("metadata has an empty key")
        k, v = len(key.encode()), len(value.encode())
        if max(k, v) > limits.max_metadata_value_bytes:
            raise InvalidRequest(
                f"metadata entry {key[:40]!r} is {max(k, v)} bytes; keys and values may have at most "
                f"{limits.max_metadata_value_bytes} bytes"
            )
        total += k + v
    if total > limits.max_metadata_bytes:
        raise InvalidRequest(f"metadata is {total} bytes; the limit is {limits.max_metadata_bytes} bytes")
    return metadata


def _ended_with_failure(run: Run, context: grpc.aio.ServicerContext) -> bool:
    """True when the run failed; the call then ends with the failure's status code and message."""
    outcome = run.outcome
    if isinstance(outcome, ev.RunFailed):
        refuse(context, grpc.StatusCode[outcome.code], outcome.message)
        return True
    return False


class _SentCounts:
    """The events-sent counter for one stream: counted locally by event type and added to the Prometheus counter
    every `every` events and when the stream ends, since a labelled `inc()` per event (a lock each time) was a
    measurable share of the per-event cost."""

    every = 64

    def __init__(self) -> None:
        self.counts: dict[type[ev.Event], int] = {}
        self.pending = 0

    def add(self, kind: type[ev.Event]) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        self.pending += 1
        if self.pending >= self.every:
            self.flush()

    def flush(self) -> None:
        for kind, n in self.counts.items():
            telemetry.child(telemetry.EVENTS, event_kind(kind)).inc(n)
        self.counts.clear()
        self.pending = 0


def fingerprint(request: pb.RunAgentRequest) -> str:
    """What an idempotency key promises: the same request. Deterministic serialization, hashed."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
