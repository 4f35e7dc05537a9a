"""The gRPC servicer: validates requests, starts runs in the registry, streams their logs and ends each call with
its status. It is thin on purpose: runs live in `service/runs.py`, the loop in `service/loop.py`, validation in
`validate.py`; a handler raises the service's errors (`service/errors.py`) and `status.py` maps them, once.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service import events as ev
from service import telemetry
from service.callers import Caller, CallerLimits, current_caller
from service.config import Config
from service.deadline import run_margin_s
from service.deliver import Deliveries
from service.errors import (
    AfterSeqOutOfRange,
    InvalidRequest,
    NotFound,
    RunAlreadyEnded,
    RunCancelled,
    ServerDraining,
    SubscriberTooSlow,
)
from service.models.base import ToolSpec
from service.rpc.convert import run_result, run_state, run_to_proto, to_proto
from service.rpc.interact import InteractRpcs
from service.rpc.status import end_call, streaming, unary
from service.rpc.validate import Validator, fingerprint
from service.rpc.values import struct
from service.run import Run, RunState
from service.runs import RunRegistry
from tools.base import Tool

log = logging.getLogger(__name__)


_CANCEL_MODES = frozenset(pb.CancelRunRequest.Mode.values())


class AgentServicer(InteractRpcs, agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
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
        deliveries: Deliveries | None = None,
    ) -> None:
        """`anonymous`: the caller of calls that name none (auth off). `tool_specs`: the tools as the model sees them,
        by name; `default_model`: the model of a request that names none."""
        self.registry = registry
        self.deliveries = deliveries  # approvals, steering, tool cancels to runs (rpc/interact.py)
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
        durable = registry.durable is not None
        self.validator = Validator(config, self.tools, self.unavailable, default_model, durable=durable)

    def caller(self) -> Caller:
        """This call's caller, as the auth interceptor identified it (anonymous when auth is off)."""
        return current_caller() or self.anonymous

    def run_id(self, run_id: str) -> str:
        if not run_id:
            raise InvalidRequest("run_id is required: the id RunAgent's first event or SubmitRun returned")
        return run_id

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

    @streaming
    def RunAgent(self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AgentEvent]:
        received = self.clock()

        async def opened() -> tuple[Run, int, bool]:
            run, created = await self._start(request, context, background=False)
            return run, 0, created and request.on_disconnect != pb.RunAgentRequest.CONTINUE

        return self._stream(opened, context, received=received)

    @streaming
    def WatchRun(self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AgentEvent]:
        async def opened() -> tuple[Run, int, bool]:
            run = await self.registry.watch(self.run_id(request.run_id), self.caller().name, request.after_seq)
            logged = len(run.log)
            if request.after_seq > logged:  # no caller can have seen a seq not logged yet, live run or ended
                where = f"ended at seq {logged}" if run.finished else f"is running, at seq {logged}"
                raise AfterSeqOutOfRange(f"after_seq={request.after_seq}, but run {run.id} {where}")
            return run, request.after_seq, False

        return self._stream(opened, context)

    @unary
    async def CancelRun(self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext) -> pb.CancelRunResponse:
        if request.mode not in _CANCEL_MODES:
            raise InvalidRequest(f"unknown mode {request.mode}: IMMEDIATE or AFTER_TURN")
        caller = self.caller().name
        after_turn = request.mode == pb.CancelRunRequest.AFTER_TURN
        try:
            run = self.registry.get(self.run_id(request.run_id), caller=caller)
        except NotFound:
            if self.registry.elsewhere is None:
                raise
            # driven by another process, or (embedded run log) by this one before a restart
            record = await self.registry.record(request.run_id, caller)
            record = await self.registry.cancel_elsewhere(record, after_turn=after_turn)
            return pb.CancelRunResponse(run_id=record.run_id, state=run_state(RunState(record.state)))
        if run.state is RunState.CANCELLED:  # idempotent: cancelling a cancelled run is a success
            return pb.CancelRunResponse(run_id=run.id, state=run_state(run.state))
        if run.finished:
            raise RunAlreadyEnded(f"run {run.id} already ended ({run.state.value}); nothing to cancel")
        self.registry.cancel(run, after_turn=after_turn)
        if not after_turn and run.task is not None:
            # usually done within milliseconds: answer with the final state when it is there
            await asyncio.wait([run.task], timeout=1.0)
        return pb.CancelRunResponse(run_id=run.id, state=run_state(run.state))

    @unary
    async def SubmitRun(self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext) -> pb.SubmitRunResponse:
        run, _ = await self._start(request, context, background=True)
        return pb.SubmitRunResponse(run_id=run.id, state=run_state(run.state))

    @unary
    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.Run:
        return run_to_proto(await self.registry.record(self.run_id(request.run_id), self.caller().name))

    @unary
    async def RunAgentUnary(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.RunResult | None:
        run, created = await self._start(request, context, background=False)
        try:
            # another process's run (an idempotency key that names it) has no task here: wait for its end
            await asyncio.shield(run.task if run.task is not None else run.ended())
        except asyncio.CancelledError:
            # as for the stream: CONTINUE leaves the run going; the same idempotency key attaches to it again
            if created and not run.finished and request.on_disconnect != pb.RunAgentRequest.CONTINUE:
                run.control.stop_now(RunCancelled("the caller cancelled or disconnected"))
            raise
        if _ended_with_failure(run, context):
            return None
        return run_result(run)

    async def _start(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext, *, background: bool
    ) -> tuple[Run, bool]:
        if self.draining:
            raise ServerDraining("the server is shutting down; retry on another replica")
        run_id = f"run_{secrets.token_hex(12)}"  # 96 random bits; uuid4() costs 5x more
        caller = self.caller()
        key = request.idempotency_key
        digest = fingerprint(request) if key else ""  # hashing the request costs; only a key needs it
        spec = self.validator.run_spec(request, run_id, caller, background=background)
        deadline = None
        remaining = context.time_remaining()
        # a CONTINUE run outlives its call, and so the call's deadline: only `runs.max_run_s` bounds it
        if remaining is not None and not background and request.on_disconnect != pb.RunAgentRequest.CONTINUE:
            margin = run_margin_s(remaining, self.config.runs.deadline_margin_s)
            deadline = asyncio.get_running_loop().time() + remaining - margin
        return await self.registry.open(
            spec,
            caller=caller,
            limits=self.caller_limits,
            key=key,
            fingerprint=digest,
            deadline=deadline,
            background=background,
        )

    async def _stream(
        self,
        opened: Callable[[], Awaitable[tuple[Run, int, bool]]],
        context: grpc.aio.ServicerContext,
        *,
        received: float | None = None,
    ) -> AsyncIterator[pb.AgentEvent]:
        """Open the run (`opened`: the run, the seq to send after, and whether this stream owns it), send its log
        from there, live, then end with the run's status. An owner's disconnect cancels the run (on_disconnect=CANCEL).
        Opened here, inside the stream, so that a start that awaits the shared store costs no extra hop per event."""
        run, after_seq, owner = await opened()
        task = asyncio.current_task()
        assert task is not None
        self.streams.add(task)
        runs = self.config.runs
        sent = _SentCounts()
        counts = sent.counts  # counted here, not through a method: this is the per-event path
        try:
            async for entry in run.follow(
                after_seq, coalesce_lag=runs.subscriber_coalesce_lag, max_lag=runs.subscriber_max_lag
            ):
                event = entry.event
                message = to_proto(event, run.id, entry.seq, time_ns=entry.time_ns, first_seq=entry.first_seq)
                kind = type(event)
                counts[kind] = counts.get(kind, 0) + 1
                if entry.seq >= sent.due:
                    sent.flush(entry.seq)
                yield message
                if received is not None:  # grpc asks for the next message once it has sent this one
                    telemetry.FIRST_EVENT.observe(self.clock() - received)
                    received = None
        except SubscriberTooSlow as exc:
            log.warning("slow subscriber dropped", extra={"run_id": run.id, "last_seq": exc.last_seq})
            raise  # RESOURCE_EXHAUSTED, telling it where to resume
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
        _ended_with_failure(run, context)


def _ended_with_failure(run: Run, context: grpc.aio.ServicerContext) -> bool:
    """True when the run failed; the call then ends with the failure's status code and message."""
    outcome = run.outcome
    if isinstance(outcome, ev.RunFailed):
        end_call(context, outcome.code, outcome.message)
        return True
    return False


class _SentCounts:
    """The events-sent counter for one stream: counted locally by event type (in `_stream`) and added to the
    Prometheus counter once the stream's seq passes `due`, every `every` events, and when the stream ends, since a
    labelled `inc()` per event (a lock each time) was a measurable share of the per-event cost."""

    every = 64

    def __init__(self) -> None:
        self.counts: dict[type[ev.Event], int] = {}
        self.due = self.every

    def flush(self, seq: int = 0) -> None:
        for kind, n in self.counts.items():
            telemetry.child(telemetry.EVENTS, kind.kind).inc(n)
        self.counts.clear()
        self.due = seq + self.every
