"""The interactive RPCs (issue 17, docs/interactive.md): `Interact`, a bidirectional stream that starts or attaches to
a run and carries approvals, steering and cancels while the run's events flow back; and `ResolveApproval`,
`SendInput`, `CancelToolCall`, the same for callers that only stream (or a second party). Mixed into the servicer:
each handler validates, maps to a `deliver.Message` and delegates (`service/deliver.py` finds the run, here or on
another replica).

On `Interact`, a message the run cannot take now gets an `error` event with seq 0 (it is not in the run's log, and
the run goes on); a malformed message ends the call with INVALID_ARGUMENT. Client messages are read one at a time,
each handled before the next is read, and the events for refusals wait in a bounded queue: a client that sends faster
than this goes is held back by gRPC's flow control, never buffered without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import DecodeError

from agent.v1 import agent_pb2 as pb
from service.aio import merge
from service.deliver import Deliveries, Message
from service.errors import AfterSeqOutOfRange, AgentError, InvalidRequest, RunAlreadyEnded
from service.interact import AFTER_TURN, ASAP
from service.rpc.runstream import follow_opened
from service.rpc.status import streaming, unary
from service.run import Run

if TYPE_CHECKING:
    from service.callers import Caller
    from service.runs import RunRegistry

NOTES_QUEUED = 16  # refusals not yet sent on one stream; the reader waits beyond it (backpressure)
_WHEN = {pb.INPUT_WHEN_UNSPECIFIED: ASAP, pb.ASAP: ASAP, pb.AFTER_TURN: AFTER_TURN}
_CANCEL_MODES = frozenset(pb.CancelRunRequest.Mode.values())  # unset is IMMEDIATE, as for CancelRun


class InteractRpcs:
    """The servicer's interactive RPCs; the servicer gives `registry`, `deliveries`, `caller()`, `run_id()`,
    and `_start()`; the run's events come from `runstream.follow_opened`."""

    registry: RunRegistry
    deliveries: Deliveries | None
    caller: Callable[[], Caller]
    run_id: Callable[[str], str]
    _start: Callable[..., Awaitable[tuple[Run, bool]]]

    def _deliveries(self) -> Deliveries:
        if self.deliveries is None:
            raise InvalidRequest("this server takes no interaction messages")
        return self.deliveries

    @unary
    async def ResolveApproval(
        self, request: pb.ResolveApprovalRequest, context: grpc.aio.ServicerContext
    ) -> pb.ResolveApprovalResponse:
        if request.decision not in (pb.ResolveApprovalRequest.APPROVE, pb.ResolveApprovalRequest.DENY):
            raise InvalidRequest("decision must be APPROVE or DENY")
        approve = request.decision == pb.ResolveApprovalRequest.APPROVE
        message = decision(request.call_id, request.reason, request, approve, self.caller().name)
        await self._deliveries().send(self.run_id(request.run_id), message)
        return pb.ResolveApprovalResponse(run_id=request.run_id, call_id=request.call_id)

    @unary
    async def SendInput(self, request: pb.SendInputRequest, context: grpc.aio.ServicerContext) -> pb.SendInputResponse:
        await self._deliveries().send(self.run_id(request.run_id), steering(request, self.caller().name))
        return pb.SendInputResponse(run_id=request.run_id)

    @unary
    async def CancelToolCall(
        self, request: pb.CancelToolCallRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelToolCallResponse:
        message = Message("cancel", self.caller().name, call_id=call_id(request.call_id))
        await self._deliveries().send(self.run_id(request.run_id), message)
        return pb.CancelToolCallResponse(run_id=request.run_id, call_id=request.call_id)

    @streaming
    def Interact(
        self, requests: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        return self._interact(requests, context)

    async def _interact(
        self, requests: AsyncIterator[pb.ClientMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        notes: asyncio.Queue[pb.AgentEvent | AgentError] = asyncio.Queue(maxsize=NOTES_QUEUED)
        opened: asyncio.Future[Run] = asyncio.get_running_loop().create_future()

        async def open_run() -> tuple[Run, int, bool]:
            try:
                first = await anext(requests, None)
            except DecodeError as exc:
                raise undecodable(exc) from None
            kind = None if first is None else first.WhichOneof("message")
            if first is not None and kind == "start":
                run, created = await self._start(first.start, context, background=False)
                owner = created and first.start.on_disconnect != pb.RunAgentRequest.CONTINUE
                opened.set_result(run)
                return run, 0, owner
            if first is not None and kind == "attach":
                run_id, after = self.run_id(first.attach.run_id), first.attach.after_seq
                run = await self.registry.watch(run_id, self.caller().name, after)
                after = run.resume_after(after)
                if after > len(run.log):
                    raise AfterSeqOutOfRange(f"after_seq={after}, but run {run.id} is at seq {len(run.log)}")
                opened.set_result(run)
                return run, after, False
            raise InvalidRequest("the first message starts a run (start) or attaches to one (attach)")

        reader = asyncio.create_task(self._read(requests, opened, notes), name="interact reader")
        try:
            async with contextlib.aclosing(
                merge(follow_opened(self, open_run, context), _notes(notes, opened), name="interact")
            ) as events:
                async for event in events:
                    yield event
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(
        self,
        requests: AsyncIterator[pb.ClientMessage],
        opened: asyncio.Future[Run],
        notes: asyncio.Queue[pb.AgentEvent | AgentError],
    ) -> None:
        """The client's later messages, one at a time: each delivered before the next is read."""
        run = await opened
        identity = self.caller().name
        try:
            async for message in requests:
                parsed = client_message(message, identity)  # malformed: InvalidRequest ends the call
                try:
                    _for_this_run(message, run.id)
                    if isinstance(parsed, Message):
                        await self._deliveries().send(run.id, parsed)
                    else:
                        await self._cancel_run(run, after_turn=parsed)
                except AgentError as exc:
                    what = message.WhichOneof("message")
                    text = f"{what} refused: {exc.message}"
                    await notes.put(pb.AgentEvent(run_id=run.id, error=pb.Error(code=exc.code, message=text)))
        except AgentError as exc:
            await notes.put(exc)
        except DecodeError as exc:
            await notes.put(undecodable(exc))

    async def _cancel_run(self, run: Run, *, after_turn: bool) -> None:
        """cancel_run on Interact: as CancelRun, for the stream's run (driven here or by another replica)."""
        if run.finished:
            raise RunAlreadyEnded(f"run {run.id} already ended ({run.state.value}); nothing to cancel")
        if self.registry.runs.get(run.id) is run:
            self.registry.cancel(run, after_turn=after_turn)
            await self.registry.keep_cancel(run, after_turn=after_turn)
        else:
            record = await self.registry.record(run.id, self.caller().name)
            await self.registry.cancel_elsewhere(record, after_turn=after_turn)


async def _notes(
    notes: asyncio.Queue[pb.AgentEvent | AgentError], opened: asyncio.Future[Run]
) -> AsyncIterator[pb.AgentEvent]:
    """The stream's own events (refusals), until its run ends; a malformed message's error ends the call."""
    run = await opened
    ended = asyncio.ensure_future(run.ended())
    get: asyncio.Future[pb.AgentEvent | AgentError] | None = None
    try:
        while True:
            get = asyncio.ensure_future(notes.get())
            done, _ = await asyncio.wait((get, ended), return_when=asyncio.FIRST_COMPLETED)
            if get not in done:
                get.cancel()
                while not notes.empty():  # refusals of messages read before the end still go out
                    note = notes.get_nowait()
                    if isinstance(note, pb.AgentEvent):
                        yield note
                return
            note = get.result()
            if isinstance(note, AgentError):
                raise note
            yield note
    finally:  # the call may end while both wait (a client gone): a pending get would outlive it
        ended.cancel()
        if get is not None:
            get.cancel()


def client_message(message: pb.ClientMessage, identity: str) -> Message | bool:
    """A later message on Interact as a `deliver.Message` (or, for cancel_run, whether after the turn);
    InvalidRequest when malformed."""
    kind = message.WhichOneof("message")
    match kind:
        case "approve" | "deny":
            d = getattr(message, kind)
            return decision(d.call_id, d.reason, d, kind == "approve", identity)
        case "send_input":
            return steering(message.send_input, identity)
        case "cancel_tool":
            return Message("cancel", identity, call_id=call_id(message.cancel_tool.call_id))
        case "cancel_run":
            mode = message.cancel_run.mode
            if mode not in _CANCEL_MODES:
                raise InvalidRequest(f"unknown cancel_run mode {mode}: IMMEDIATE or AFTER_TURN")
            return bool(mode == pb.CancelRunRequest.AFTER_TURN)
        case "start" | "attach":
            raise InvalidRequest(f"{kind} only as the first message of an Interact stream")
        case _:
            raise InvalidRequest("an empty ClientMessage: set one of its fields")


MAX_REASON = 2000


def _for_this_run(message: pb.ClientMessage, run_id: str) -> None:
    """An Interact message acts on the stream's run: a `run_id` naming another is refused, not applied to this one
    (a caller that meant another run would otherwise steer or cancel the wrong one)."""
    named = getattr(getattr(message, message.WhichOneof("message") or "", None), "run_id", "")
    if named and named != run_id:
        raise InvalidRequest(
            f"run_id {named[:100]!r} is not this stream's run ({run_id}): on Interact a message acts on the stream's "
            "run; leave run_id empty, or call SendInput, CancelToolCall or CancelRun for another run"
        )


def undecodable(exc: DecodeError) -> InvalidRequest:
    """A client message whose bytes are no ClientMessage (grpc's default: UNKNOWN, "Unexpected DecodeError")."""
    return InvalidRequest(f"a message is not a valid agent.v1.ClientMessage: {exc}")


def call_id(value: str) -> str:
    if not value:
        raise InvalidRequest("call_id is required: the id of a tool_call event")
    return value


def decision(call: str, reason: str, source: Any, approve: bool, identity: str) -> Message:
    edited = MessageToDict(source.edited_input) if source.HasField("edited_input") else None
    if edited is not None and not approve:
        raise InvalidRequest("edited_input goes with an approval, not a denial")
    if len(reason) > MAX_REASON:  # it goes into the run's log, the model's tool result and the audit record
        raise InvalidRequest(f"reason is limited to {MAX_REASON} characters, got {len(reason)}")
    return Message("decide", identity, call_id=call_id(call), approved=approve, reason=reason, edited_input=edited)


def steering(request: pb.SendInputRequest, identity: str) -> Message:
    if not request.text.strip():
        raise InvalidRequest("send_input needs text")
    if request.when not in _WHEN:
        raise InvalidRequest(f"unknown when {request.when}: ASAP or AFTER_TURN")
    if len(request.text) > 32_000:
        raise InvalidRequest("send_input text is limited to 32000 characters")
    return Message("input", identity, text=request.text, when=_WHEN[request.when])
