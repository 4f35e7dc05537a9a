"""The gRPC servicer: validates requests, starts runs in the registry, streams their logs and ends each call with
its status. It is thin on purpose: runs live in `service/runs.py`, the loop in `service/loop.py`, validation in
`validate.py`; a handler raises the service's errors (`service/errors.py`) and `status.py` maps them, once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service.api import CALLER_LEFT, AgentApi, required_run_id
from service.callers import Caller, current_caller
from service.deliver import Deliveries
from service.errors import RunCancelled
from service.rpc.convert import list_runs_response, run_result, run_state, run_to_proto
from service.rpc.firsts import FirstsFirst
from service.rpc.interact import InteractRpcs
from service.rpc.runstream import ended_with_failure, run_stream
from service.rpc.status import unary
from service.run import Run

_CONTINUE = pb.RunAgentRequest.CONTINUE  # read once: a message class's enum value costs ~700 instructions a read


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
        # on a saturated loop, new calls' first events go first
        self.firsts = FirstsFirst(api.config.limits.first_events_first_s, api.load)
        self.anonymous = anonymous

    @property
    def streams(self) -> set[asyncio.Task[Any]]:
        return self.api.streams

    def run_id(self, run_id: str) -> str:
        return required_run_id(run_id)

    def caller(self) -> Caller:
        """This call's caller, as the auth interceptor identified it (anonymous when auth is off)."""
        return current_caller() or self.anonymous

    async def ListTools(self, request: pb.ListToolsRequest, context: grpc.aio.ServicerContext) -> pb.ListToolsResponse:
        return pb.ListToolsResponse(tools=self.api.list_tools(self.caller()))

    async def _open_run(self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext) -> tuple[Run, int, bool]:
        # `api.start` itself, not through `_start`: a coroutine less per stream
        caller, remaining_s = self.caller(), context.time_remaining()
        run, created = await self.api.start(request, caller, remaining_s=remaining_s, background=False)
        return run, 0, created and request.on_disconnect != _CONTINUE

    async def _open_watch(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> tuple[Run, int, bool]:
        run, after_seq = await self.api.watch(request.run_id, self.caller(), request.after_seq)
        return run, after_seq, False

    # one async generator each, from the checks to the status (service/rpc/runstream.py)
    RunAgent = run_stream(_open_run, timed=True)
    WatchRun = run_stream(_open_watch)

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
    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        return list_runs_response(*await self.api.list_runs(request, self.caller()))

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
            if created and not run.finished and request.on_disconnect != _CONTINUE:
                run.control.stop_now(RunCancelled(CALLER_LEFT))
            raise
        if ended_with_failure(run, context):
            return None
        return run_result(run)

    async def _start(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext, *, background: bool
    ) -> tuple[Run, bool]:
        return await self.api.start(request, self.caller(), remaining_s=context.time_remaining(), background=background)
