"""The application layer both faces call (`service/rpc/` for gRPC, `service/http/` for HTTP): start, watch, cancel and
look up runs, and list tools, for a caller the face has identified. It speaks the wire contract (protobuf requests)
but knows no transport: a face reads its deadline, caller and request off its own protocol and hands them here, and
raises what this raises (`service/errors.py`) into its own status mapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any

from agent.v1 import agent_pb2 as pb
from service.callers import Caller, CallerLimits
from service.config import Config
from service.deadline import MIN_RUN_S, run_margin_s
from service.errors import (
    AfterSeqOutOfRange,
    DeadlineTooShort,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    RunAlreadyEnded,
    RunCancelled,
    ServerDraining,
)
from service.ids import new_run_id
from service.listing import RunQuery, decode_token, encode_token, key_of, merge, page_size
from service.models.base import ToolSpec
from service.rpc.validate import Validator, fingerprint
from service.rpc.values import struct
from service.run import Run, RunRecord, RunState
from service.runs import RunRegistry
from tools.base import Tool

if TYPE_CHECKING:
    from service.push.pusher import Pusher

_CANCEL_MODES = frozenset(pb.CancelRunRequest.Mode.values())
_CONTINUE = pb.RunAgentRequest.CONTINUE  # read once: a message class's enum value costs ~700 instructions a read
# Run.State values as RunState values ("queued"…): the enum names, lower case
_LISTED_STATES = {number: name.lower() for name, number in pb.Run.State.items() if number}


class AgentApi:
    """What a call may do with runs, whatever carried it. `streams` holds the tasks of every face's open streams, so
    that a drain waits for the streams of both."""

    def __init__(
        self,
        registry: RunRegistry,
        tools: Mapping[str, Tool[Any]],
        config: Config,
        *,
        caller_limits: CallerLimits,
        tool_specs: Callable[[Sequence[str]], list[ToolSpec]],
        default_model: str,
        one_model: bool = False,
        push: Pusher | None = None,
    ) -> None:
        """`tool_specs`: the tools as the model sees them, by name; `default_model`: the model of a request that
        names none; `push`: takes SubmitRun's callbacks (None: a callback is refused)."""
        self.push = push
        self.registry = registry
        # the event loop's busy share, probed by the registry: run deadlines' margins follow it
        self.load = registry.load
        # a tool that cannot work here is left out of ListTools and of a run's default tools; a run naming it fails
        self.tools = {name: tool for name, tool in tools.items() if not tool.unavailable}
        self.unavailable = {name: tool.unavailable for name, tool in tools.items() if tool.unavailable}
        self.config = config
        self.draining = False
        self.streams: set[asyncio.Task[Any]] = set()
        self.caller_limits = caller_limits
        self.tool_specs = tool_specs
        durable = registry.durable is not None
        self.validator = Validator(
            config, self.tools, self.unavailable, default_model, durable=durable, one_model=one_model
        )

    def list_tools(self, caller: Caller) -> list[pb.ToolInfo]:
        allowed = [name for name in self.tools if caller.may_use(name)]
        # the loop's specs: each tool's JSON Schema is generated once, not per call
        return [
            pb.ToolInfo(
                name=spec.name,
                description=spec.description,
                input_schema=struct(spec.input_schema),
                streaming=self.tools[spec.name].streaming,
            )
            for spec in self.tool_specs(allowed)
        ]

    async def start(
        self, request: pb.RunAgentRequest, caller: Caller, *, remaining_s: float | None, background: bool
    ) -> tuple[Run, bool]:
        """Start the run `request` asks for (or find the one its idempotency key names); True when started here.
        `remaining_s`: the time left of the call's deadline, None without one."""
        if self.draining:
            raise ServerDraining("the server is shutting down; retry on another replica")
        run_id = new_run_id()
        key = request.idempotency_key
        spec = self.validator.run_spec(request, run_id, caller, background=background)
        digest = fingerprint(spec, request) if key else ""  # hashing the request costs; only a key needs it
        deadline = None
        # a CONTINUE run outlives its call, and so the call's deadline: only `runs.max_run_s` bounds it
        if remaining_s is not None and not background and request.on_disconnect != _CONTINUE:
            runs = self.config.runs
            margin = run_margin_s(
                remaining_s, runs.deadline_margin_s, busy=self.load.busy, busy_s=runs.deadline_busy_margin_s
            )
            if remaining_s - margin < MIN_RUN_S:
                raise DeadlineTooShort(
                    f"the call's deadline is {remaining_s * 1000:.1f} ms away: a run ends {margin * 1000:.1f} ms "
                    f"before it to send its error event and needs {MIN_RUN_S * 1000:.0f} ms more to start; no run "
                    "started, give the call more time"
                )
            deadline = asyncio.get_running_loop().time() + remaining_s - margin
        # `run_spec` refused a callback of a streaming call: only SubmitRun's request is asked for one
        callback = request.callback if background and request.HasField("callback") else None
        if callback is not None:
            if self.push is None:
                raise InvalidRequest("this server pushes no callbacks")
            # registered before the run starts, so that its end cannot come first
            await self.push.register(run_id, caller.name, callback.url, callback.secret)
        try:
            run, created = await self.registry.open(
                spec,
                caller=caller,
                limits=self.caller_limits,
                key=key,
                fingerprint=digest,
                deadline=deadline,
                background=background,
            )
        except BaseException:
            if callback is not None and self.push is not None:
                await asyncio.shield(self.push.forget(run_id))
            raise
        if callback is not None and self.push is not None and not created:
            await self.push.forget(run_id)  # the idempotency key named a run that has its own callback
        return run, created

    async def watch(self, run_id: str, caller: Caller, after_seq: int) -> tuple[Run, int]:
        """The run to follow and the seq to follow it after: `after_seq`, or before a `run_recovered` that may have
        replaced it (`Run.resume_after`); OUT_OF_RANGE for a seq it has not logged."""
        if after_seq < 0:
            raise InvalidRequest(f"after_seq must not be negative, got {after_seq}")
        run = await self.registry.watch(required_run_id(run_id), caller.name, after_seq)
        after_seq = run.resume_after(after_seq)
        logged = len(run.log)
        if after_seq > logged:  # no caller can have seen a seq not logged yet, live run or ended
            where = f"ended at seq {logged}" if run.finished else f"is {run.state.value}, at seq {logged}"
            raise AfterSeqOutOfRange(f"after_seq={after_seq}, but run {run.id} {where}")
        return run, after_seq

    async def cancel(self, run_id: str, caller: Caller, mode: int) -> tuple[str, RunState]:
        """Cancel a run (IMMEDIATE or AFTER_TURN, `pb.CancelRunRequest.Mode`); its id and state after."""
        if mode not in _CANCEL_MODES:
            raise InvalidRequest(f"unknown mode {mode}: IMMEDIATE or AFTER_TURN")
        after_turn = mode == pb.CancelRunRequest.AFTER_TURN
        try:
            run = self.registry.get(required_run_id(run_id), caller=caller.name)
        except NotFound:
            if self.registry.elsewhere is None:  # driven by another process, or (run log) by this one before a restart
                raise
            record = await self.registry.record(run_id, caller.name)  # driven by another process
            if record.state == RunState.QUEUED.value:
                record = await self._cancel_queued(record)
            record = await self.registry.cancel_elsewhere(record, after_turn=after_turn)
            return record.run_id, RunState(record.state)
        if run.state is RunState.CANCELLED:  # idempotent: cancelling a cancelled run is a success
            return run.id, run.state
        if run.finished:
            raise RunAlreadyEnded(f"run {run.id} already ended ({run.state.value}); nothing to cancel")
        queued = run.state is RunState.QUEUED  # no turn to finish: cancelled at once, whatever the mode
        self.registry.cancel(run, after_turn=after_turn)
        await self.registry.keep_cancel(run, after_turn=after_turn)
        if (queued or not after_turn) and run.task is not None:
            # usually done within milliseconds: answer with the final state when it is there
            await asyncio.wait([run.task], timeout=1.0)
        return run.id, run.state

    async def list_runs(self, request: pb.ListRunsRequest, caller: Caller) -> tuple[list[RunRecord], str]:
        """A page of runs, newest first, and the token of the next page ("" on the last). Another caller's runs
        only for an `admin` caller."""
        whose = request.caller or caller.name
        if whose != caller.name and not caller.config.admin:
            raise PermissionDenied(
                f"caller {caller.name} may list only its own runs (listing others' needs admin)",
                reason="LISTING_NOT_PERMITTED",
            )
        unknown = [s for s in request.states if s not in _LISTED_STATES]
        if unknown:
            raise InvalidRequest(f"unknown run state(s) {unknown}: QUEUED, RUNNING, SUCCEEDED, FAILED or CANCELLED")
        size = page_size(request.page_size)
        query = RunQuery(
            whose, frozenset(_LISTED_STATES[s] for s in request.states), decode_token(request.page_token), size + 1
        )
        records, more = merge(await self.registry.list_runs(query), size)
        return records, encode_token(key_of(records[-1])) if more else ""

    async def _cancel_queued(self, record: RunRecord) -> RunRecord:
        """A run waiting in the fleet's durable queue is cancelled there (it never starts); one a process claimed
        just now is cancelled as any running run, once its new owner has recorded itself (within a second)."""
        durable = self.registry.durable
        if durable is None or durable.queue is None:
            return record
        if await durable.cancel_queued(record.run_id):
            return record._replace(state=RunState.CANCELLED.value)
        for _ in range(20):  # claimed meanwhile: its claimer's first shipment names it as the owner
            await asyncio.sleep(0.05)
            record = await self.registry.record(record.run_id, record.caller)
            if record.state != RunState.QUEUED.value:
                break
        return record

    async def record(self, run_id: str, caller: Caller) -> RunRecord:
        record = await self.registry.record(required_run_id(run_id), caller.name)
        durable = self.registry.durable
        if record.state == RunState.QUEUED.value and durable is not None and durable.queue is not None:
            # from the checkpoint store, which holds the fleet's queue: the same answer from every replica
            record = record._replace(queue_position=await durable.position(record.run_id))
        return record

    def streaming(self, run: Run, *, owner: bool) -> Streaming:
        """Around a face's loop over the run's log: counts the stream for the drain, and, when the stream `owner`s
        the run (it started it and on_disconnect is CANCEL), stops the run if the stream ends early."""
        return Streaming(self.streams, run, owner)


# A retry after a drop replays the run its idempotency key started, this cancel included: the message says what to do
CALLER_LEFT = (
    "the caller cancelled or disconnected (on_disconnect CANCEL); the same idempotency_key replays this run: send a "
    "new key to run again, or on_disconnect CONTINUE to have a retry attach to the run still going"
)


class Streaming:
    """`AgentApi.streaming`: a class, not a `contextlib.contextmanager`, which would cost every stream a generator
    and its wrapper; nor a generator wrapping the stream, which would cost a hop per event."""

    __slots__ = ("streams", "run", "owner", "task")

    def __init__(self, streams: set[asyncio.Task[Any]], run: Run, owner: bool) -> None:
        self.streams, self.run, self.owner = streams, run, owner

    def __enter__(self) -> None:
        task = asyncio.current_task(self.run.control.loop)  # with its loop: no getpid (see RunControl)
        assert task is not None
        self.task = task
        self.streams.add(task)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.streams.discard(self.task)
        run = self.run
        if exc is not None and self.owner and not run.finished:
            # A disconnect lands as CancelledError while the stream waits for the run, and as GeneratorExit while
            # the transport waits to send an event the stream yielded (it then closes the generator, not the task).
            # Any other exception is a bug of ours that ends the call: nobody is left to read an owned run either.
            left = isinstance(exc, asyncio.CancelledError | GeneratorExit)
            why = CALLER_LEFT if left else "the stream that started the run failed"
            run.control.stop_now(RunCancelled(why))


def required_run_id(run_id: str) -> str:
    if not run_id:
        raise InvalidRequest("run_id is required: the id RunAgent's first event or SubmitRun returned")
    if not run_id.isprintable():  # no run has such an id, and PostgreSQL refuses a NUL in a text it is compared with
        raise InvalidRequest(f"run_id {run_id[:100]!r} is not a run id: run ids are printable text")
    return run_id
