"""The gRPC servicer: validates requests, starts runs in the registry, streams their logs and ends each call with
its status. It is thin on purpose: runs live in `service/runs.py`, the loop in `service/loop.py`, validation in
`validate.py`; a handler raises the service's errors (`service/errors.py`) and `status.py` maps them, once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service import events as ev
from service import telemetry
from service.api import AgentApi
from service.callers import Caller, current_caller
from service.deliver import Deliveries
from service.errors import InvalidRequest, RunCancelled, SubscriberTooSlow
from service.rpc.convert import run_result, run_state, run_to_proto, to_proto
from service.rpc.interact import InteractRpcs
from service.rpc.status import end_call, streaming, unary
from service.run import Run

log = logging.getLogger(__name__)


class AgentServicer(InteractRpcs, agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(
        self,
        api: AgentApi,
        *,
        anonymous: Caller,
        clock: Callable[[], float] = time.perf_counter,
        deliveries: Deliveries | None = None,
    ) -> None:
        """`api`: what the calls do, shared with the HTTP face; `anonymous`: the caller of calls that name none
        (auth off); `deliveries`: approvals, steering and tool cancels to runs (rpc/interact.py)."""
        self.api = api
        self.deliveries = deliveries
        self.registry = api.registry
        self.caller_limits = api.caller_limits
        self.config = api.config
        self.clock = clock  # for the time to first event
        self.anonymous = anonymous

    @property
    def streams(self) -> set[asyncio.Task[Any]]:
        return self.api.streams

    def run_id(self, run_id: str) -> str:
        if not run_id:
            raise InvalidRequest("run_id is required: the id RunAgent's first event or SubmitRun returned")
        return run_id

    def caller(self) -> Caller:
        """This call's caller, as the auth interceptor identified it (anonymous when auth is off)."""
        return current_caller() or self.anonymous

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(tools=self.api.list_tools(self.caller()))

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
            run, after_seq = await self.api.watch(request.run_id, self.caller(), request.after_seq)
            return run, after_seq, False

        return self._stream(opened, context)

    @unary
    async def CancelRun(self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext) -> pb.CancelRunResponse:
        run_id, state = await self.api.cancel(request.run_id, self.caller(), request.mode)
        return pb.CancelRunResponse(run_id=run_id, state=run_state(state))

    @unary
    async def SubmitRun(self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext) -> pb.SubmitRunResponse:
        run, _ = await self._start(request, context, background=True)
        return pb.SubmitRunResponse(run_id=run.id, state=run_state(run.state))

    @unary
    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.Run:
        return run_to_proto(await self.api.record(request.run_id, self.caller()))

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
        return await self.api.start(request, self.caller(), remaining_s=context.time_remaining(), background=background)

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
        runs = self.config.runs
        sent = telemetry.SentCounts()
        counts = sent.counts
        try:
            with self.api.streaming(run, owner=owner):
                async for entry in run.follow(
                    after_seq, coalesce_lag=runs.subscriber_coalesce_lag, max_lag=runs.subscriber_max_lag
                ):
                    event = entry.event
                    message = to_proto(event, run.id, entry.seq, time_ns=entry.time_ns, first_seq=entry.first_seq)
                    kind = type(event)
                    counts[kind] = counts.get(kind, 0) + 1  # counted here, not through a method: the per-event path
                    if entry.seq >= sent.due:
                        sent.flush(entry.seq)
                    yield message
                    if received is not None:  # grpc asks for the next message once it has sent this one
                        telemetry.FIRST_EVENT.observe(self.clock() - received)
                        received = None
        except SubscriberTooSlow as exc:
            log.warning("slow subscriber dropped", extra={"run_id": run.id, "last_seq": exc.last_seq})
            raise  # RESOURCE_EXHAUSTED, telling it where to resume
        finally:
            sent.flush()
        _ended_with_failure(run, context)


def _ended_with_failure(run: Run, context: grpc.aio.ServicerContext) -> bool:
    """True when the run failed; the call then ends with the failure's status code and message."""
    outcome = run.outcome
    if isinstance(outcome, ev.RunFailed):
        end_call(context, outcome.code, outcome.message)
        return True
    return False
