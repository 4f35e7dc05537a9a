"""Domain events and run records as protobuf: the one place where the service's data becomes the wire contract. The
tool inputs and data inside events become `Struct`s and `Value`s by the rules of `values.py`."""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable
from typing import Any

from google.protobuf import duration_pb2, timestamp_pb2

from agent.v1 import agent_pb2 as pb
from service import events as ev
from service.rpc.values import fill_struct, scrub, set_value, struct
from service.run import Run, RunRecord, RunState


def to_proto(event: ev.Event, run_id: str, seq: int, time_ns: int | None = None, first_seq: int = 0) -> pb.AgentEvent:
    """The one place where domain events become protobuf. Fields are set in place (about twice as fast as building
    sub-messages and copying them), and text deltas, most of a run's events, are tested for first: this is the
    per-token path. Never raises for the text an event carries: a lone surrogate (half an emoji, as `json.loads`
    reads the escape "\\ud83d" from a remote body or a model's tool input) cannot be encoded as UTF-8, and protobuf
    refuses the string; such events are built again with U+FFFD in its place."""
    out = pb.AgentEvent()
    out.run_id, out.seq = run_id, seq  # 700 instructions less than as keyword arguments
    if first_seq:
        out.first_seq = first_seq
    stamp = out.time
    stamp.seconds, stamp.nanos = divmod(time.time_ns() if time_ns is None else time_ns, 1_000_000_000)
    try:  # in this function, not a wrapper: one call less per event
        if type(event) is ev.TextDelta:
            delta = out.text_delta
            delta.turn, delta.text = event.turn, event.text
        else:
            # a run's one-a-turn and one-a-run events by their exact type, the rest through `_set_payload`'s match,
            # whose class patterns cost about 550 instructions each before the one that matches (a short call's
            # four events 65,200 -> 59,700 instructions, measured alone under callgrind)
            setter: Setter = _BY_TYPE.get(type(event), _set_payload)
            setter(out, event)
    except UnicodeEncodeError:
        return to_proto(_scrubbed(event), run_id, seq, time_ns=time_ns, first_seq=first_seq)
    return out


def _set_run_started(out: pb.AgentEvent, event: ev.RunStarted) -> None:
    started = out.run_started
    started.model, started.max_turns = event.model, event.max_turns
    started.tools.extend(event.tools)


def _set_usage(out: pb.AgentEvent, event: ev.Usage) -> None:
    usage = out.usage  # present once a field is set, even to its default (tests/test_convert.py)
    usage.turn, usage.input_tokens, usage.output_tokens = event.turn, event.input_tokens, event.output_tokens
    usage.total_input_tokens, usage.total_output_tokens = event.total_input_tokens, event.total_output_tokens


def _set_final_response(out: pb.AgentEvent, event: ev.FinalResponse) -> None:
    final = out.final_response
    final.text, final.stop_reason, final.turns = event.text, event.stop_reason, event.turns
    final.tool_calls, final.input_tokens, final.output_tokens = (
        event.tool_calls,
        event.input_tokens,
        event.output_tokens,
    )
    _set_duration(final.duration, event.duration_s)


Setter = Callable[[pb.AgentEvent, Any], None]
_BY_TYPE: dict[type, Setter] = {
    ev.RunStarted: _set_run_started,
    ev.Usage: _set_usage,
    ev.FinalResponse: _set_final_response,
}


def _set_payload(out: pb.AgentEvent, event: ev.Event) -> None:
    match event:
        case ev.Thinking():
            thinking = out.thinking
            thinking.turn, thinking.text = event.turn, event.text
        case ev.ToolCallDelta():
            piece = out.tool_call_delta
            piece.call_id, piece.partial_json = event.call_id, event.partial_json
        case ev.RunStarted():  # a subclass of these three, not found by its exact type in `_BY_TYPE`
            _set_run_started(out, event)
        case ev.Usage():
            _set_usage(out, event)
        case ev.FinalResponse():
            _set_final_response(out, event)
        case ev.ToolCall():
            out.tool_call.CopyFrom(pb.ToolCall(turn=event.turn, call_id=event.call_id, name=event.name))
        case ev.ToolCallReady():
            ready = out.tool_call_ready
            ready.call_id, ready.name = event.call_id, event.name
            ready.input.SetInParent()  # present even when empty, as the model sent it
            fill_struct(ready.input, event.input, 1)
        case ev.ToolResultChunk() | ev.ToolDataPart() | ev.ToolResult():
            _set_tool_data(out, event)
        case _:
            _set_occasional(out, event)


def _set_occasional(out: pb.AgentEvent, event: ev.Event) -> None:
    """The events a run sends a few of (retries, fallbacks, one per turn or per run), after the frequent ones."""
    match event:
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
        case ev.ModelRetry():
            out.model_retry.CopyFrom(
                pb.ModelRetry(
                    turn=event.turn,
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
        case ev.RunRecovered():
            out.run_recovered.CopyFrom(
                pb.RunRecovered(step_no=event.step_no, turn=event.turn, seq=event.seq, reason=event.reason)
            )
        case ev.ApprovalRequired():
            required = out.approval_required
            required.call_id, required.name, required.reason = event.call_id, event.name, event.reason
            required.input.SetInParent()
            fill_struct(required.input, event.input, 1)
            required.deadline.CopyFrom(_timestamp(int(event.deadline * 1e9)))
            required.approvers.extend(event.approvers)
        case ev.ApprovalDecided():
            decided = out.approval_decided
            decided.call_id, decided.approved = event.call_id, event.approved
            decided.decided_by, decided.reason = event.decided_by, event.reason
            if event.edited_input is not None:
                fill_struct(decided.edited_input, event.edited_input, 1)
        case ev.InputReceived():
            out.input_received.CopyFrom(
                pb.InputReceived(text=event.text, when=_INPUT_WHEN[event.when], sent_by=event.sent_by)
            )
        case ev.RunFailed():
            out.error.CopyFrom(pb.Error(code=event.code, message=event.message, retryable=event.retryable))
        case _:
            raise TypeError(f"no protobuf mapping for {type(event).__name__}")


def _set_tool_data(out: pb.AgentEvent, event: ev.ToolResultChunk | ev.ToolDataPart | ev.ToolResult) -> None:
    """The events that carry tool data. Data that came in parts (`data_parts`) is not set again."""
    if type(event) is ev.ToolDataPart:
        part = out.tool_data_part
        part.call_id, part.index, part.total, part.json = event.call_id, event.index, event.total, event.json
    elif type(event) is ev.ToolResultChunk:
        chunk = out.tool_result_chunk
        chunk.CopyFrom(
            pb.ToolResultChunk(call_id=event.call_id, index=event.index, total=event.total, data_parts=event.data_parts)
        )
        if not event.data_parts:
            set_value(chunk.data, event.data, 0)
    elif type(event) is ev.ToolResult:
        out.tool_result.CopyFrom(
            pb.ToolResult(
                call_id=event.call_id,
                name=event.name,
                status=_TOOL_STATUS[event.status],
                duration=_duration(event.duration_s),
                error=event.error,
                attempts=event.attempts,
                cache_hit=event.cache_hit,
                answered_by=event.answered_by,
                data_parts=event.data_parts,
            )
        )
        if event.ok and not event.data_parts:
            set_value(out.tool_result.data, event.data, 0)


_INPUT_WHEN = {"asap": pb.ASAP, "after_turn": pb.AFTER_TURN}
_TOOL_STATUS = {status: pb.ToolStatus.Value(f"TOOL_STATUS_{status.name}") for status in ev.ToolStatus}


def _timestamp(time_ns: int | None = None) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns() if time_ns is None else time_ns)
    return ts


def _duration(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    _set_duration(d, seconds)
    return d


def _set_duration(out: duration_pb2.Duration, seconds: float) -> None:
    """`out.FromNanoseconds(int(seconds * 1e9))` without its two Python calls (1,700 instructions less, once a run)."""
    whole, nanos = divmod(int(seconds * 1e9), 1_000_000_000)
    if whole < 0 and nanos:  # negative: nanos negative too, as FromNanoseconds normalizes it
        whole, nanos = whole + 1, nanos - 1_000_000_000
    out.seconds, out.nanos = whole, nanos


def _scrubbed(event: ev.Event) -> ev.Event:
    """`event` with every lone surrogate in its text, nested data included, replaced by U+FFFD."""
    fields = {f.name: scrub(getattr(event, f.name), 0) for f in dataclasses.fields(event)}
    return dataclasses.replace(event, **fields)


_RUN_STATE = {state: pb.Run.State.Value(state.name) for state in RunState}


def run_state(state: RunState) -> int:
    return int(_RUN_STATE[state])


def run_to_proto(run: Run | RunRecord, *, caller: bool = False) -> pb.Run:
    """GetRun's answer, from a run of this process or another's record; with `caller`, its caller too (ListRuns)."""
    record = run.record() if isinstance(run, Run) else run
    out = pb.Run(
        run_id=record.run_id,
        caller=record.caller if caller else "",
        state=_RUN_STATE[RunState(record.state)],
        last_seq=record.last_seq,
        created=_timestamp(record.created_ns),
        queue_position=record.queue_position,
    )
    if record.ended_ns:
        out.ended.CopyFrom(_timestamp(record.ended_ns))
    outcome = record.outcome
    if outcome is not None:
        field = to_proto(outcome, record.run_id, record.last_seq)
        if isinstance(outcome, ev.FinalResponse):
            out.final_response.CopyFrom(field.final_response)
        else:
            out.error.CopyFrom(field.error)
    return out


def list_runs_response(records: list[RunRecord], next_page_token: str) -> pb.ListRunsResponse:
    return pb.ListRunsResponse(runs=[run_to_proto(r, caller=True) for r in records], next_page_token=next_page_token)


# A unary answer's budget for tool inputs and data, well under the 4 MiB gRPC clients accept by default.
UNARY_MAX_BYTES = 2 * 2**20


def run_result(run: Run, max_bytes: int = UNARY_MAX_BYTES) -> pb.RunResult:
    """The unary answer, built from the run's event log: the final response and every tool call with its result.

    Bounded: tool inputs and data go in, in the log's order, while the answer stays under `max_bytes`; what does
    not fit is left out (unset) and `data_omitted` says so. Failing the call instead would throw away a run that
    succeeded, and its answer, for the sake of its tools' bulk, which WatchRun(run_id) still replays in full."""
    out = pb.RunResult(run_id=run.id, last_seq=len(run.log))
    if isinstance(run.outcome, ev.FinalResponse):
        out.final_response.CopyFrom(to_proto(run.outcome, run.id, len(run.log)).final_response)
    room = max_bytes - out.ByteSize()
    calls: dict[str, pb.ToolCallRecord] = {}
    parts: dict[str, list[str]] = {}
    for entry in run.log:
        event = entry.event
        if isinstance(event, ev.ToolCall):
            calls[event.call_id] = record = out.tool_calls.add(call_id=event.call_id, name=event.name, turn=event.turn)
            room -= record.ByteSize() + 8  # and its tag and length in the list
        elif isinstance(event, ev.ToolCallReady) and event.call_id in calls:
            value = struct(event.input)
            if value.ByteSize() + 8 <= room:
                calls[event.call_id].input.CopyFrom(value)
                room -= value.ByteSize() + 8
            else:
                out.data_omitted = True
        elif isinstance(event, ev.ToolDataPart):
            parts.setdefault(event.call_id, []).append(event.json)
        elif isinstance(event, ev.ToolResultChunk) and event.data_parts:
            parts.pop(event.call_id, None)  # a streaming tool's chunk: not part of the unary answer
        elif isinstance(event, ev.ToolResult) and event.call_id in calls:
            result = to_proto(event, run.id, entry.seq).tool_result
            text = "".join(parts.pop(event.call_id, ()))
            if event.data_parts and len(text) <= room:  # JSON text: at least one byte a character
                set_value(result.data, json.loads(text), 0)
            if result.HasField("data") and result.ByteSize() + 8 > room:
                result.ClearField("data")
            if event.ok and not result.HasField("data"):
                out.data_omitted = True
            calls[event.call_id].result.CopyFrom(result)
            room -= result.ByteSize() + 8
    return out
