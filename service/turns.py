"""A run's bookkeeping between model turns: the conversation and totals the loop keeps, the budget checks before a
turn's tool calls, and what the model reads of a tool call's result. Pure functions and plain state: the loop
(`service/loop.py`) is the story of the turns; this is what it keeps and how it counts."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from service import tally, telemetry
from service.control import RunControl
from service.errors import BudgetExceeded, DeadlineExceeded
from service.events import Event, FinalResponse, ToolResult, ToolStatus, Usage
from service.executor import RunContext, ToolCallRequest
from service.interact import Inbox
from service.models import base as m
from service.spec import RunSpec

if TYPE_CHECKING:
    from service.durable.journal import Journal


@dataclass(slots=True)  # one per run: slots make it about 270 instructions cheaper to make
class Totals:
    input_tokens: int = 0
    output_tokens: int = 0
    tool_calls: int = 0


class LoopState:
    """What one run accumulates: the conversation, totals, and the tool calls in flight."""

    def __init__(self, spec: RunSpec, started: float, control: RunControl) -> None:
        self.started = started
        self.spec = spec
        self.control = control
        self.history: list[dict[str, Any]] = [{"role": "user", "content": [{"type": "text", "text": spec.message}]}]
        self.totals = Totals()
        self.open_calls: dict[str, str] = {}  # call id → tool name: begun (in the model's turn) and not ended
        self.tools_started = started
        self.paused = False  # the last turn ended with pause_turn (and asked for no tool call)

    @functools.cached_property
    def context(self) -> RunContext:
        """What the tool calls know of the run: made at the first call, as a run that calls no tool needs none (a
        frozen dataclass of eight fields costs about as much as the rest of this state)."""
        spec, control = self.spec, self.control
        return RunContext(
            run_id=spec.run_id,
            offered=frozenset(spec.tools),
            metadata=spec.metadata,
            trace_context=spec.trace_context,
            remaining=control.remaining if control.deadline is not None else None,
            inbox=control.inbox,
        )

    def record(self, end: m.TurnEnd) -> list[dict[str, Any]]:
        """Add a model turn to the history and return the assistant message's content: the continuation of a paused
        turn is more of the same message (and its answer the text of all of it)."""
        if self.paused:  # a new message in its place: requests already made share the old one
            last = self.history[-1]
            self.history[-1] = {**last, "content": [*last["content"], *end.content]}
        else:
            self.history.append({"role": "assistant", "content": end.content})
        # A paused turn that asked for tools is a tool turn: left as it stands, its tool_use blocks would go back
        # without results, which the API refuses, and the caller would never see the calls end.
        self.paused = end.stop_reason == "pause_turn" and not any(b["type"] == "tool_use" for b in end.content)
        content: list[dict[str, Any]] = self.history[-1]["content"]
        return content


def steer(state: LoopState, inbox: Inbox) -> list[str]:
    """Steering texts due now (`Inbox.take_inputs`), as the user's words before the next model request (`steered`).
    Returns them (a durable run records them with the turn, and replays them with it)."""
    if not inbox.has_inputs:  # as nearly every turn: no list to take, nor one to make
        return []
    texts = [s.text for s in inbox.take_inputs(asap_only=state.paused)]
    steered(state, texts)
    return texts


def steered(state: LoopState, texts: list[str]) -> None:
    """`texts` added to the last user message (after its tool results), or a user message of their own after the
    model's."""
    if not texts:
        return
    blocks = [{"type": "text", "text": text} for text in texts]
    last = state.history[-1]
    if last["role"] == "user":  # a new message in its place: requests already made share the old one
        state.history[-1] = {**last, "content": [*last["content"], *blocks]}
    else:
        state.history.append({"role": "user", "content": blocks})
        state.paused = False  # the model's paused message is followed by the user's: its next turn is a new one


def after_turn(
    turn: int, end: m.TurnEnd, state: LoopState, clock: Callable[[], float]
) -> tuple[list[Event], list[ToolCallRequest] | None]:
    """What a model turn leads to once recorded: the events it closes with, and the tool calls to run now ([] for
    none: the run goes on to another turn), or None when the run is answered (its `FinalResponse` the last event)."""
    answer = state.record(end)
    if state.paused:
        # The API paused a long turn: sent back as it stands (the assistant message last), it goes on.
        stop_if_asked(state.control)
        return [], []
    calls = tool_calls_of(end)
    events: list[Event] = []
    if end.stop_reason == "refusal":
        # The API stopped the turn for safety: the calls in it are not the model's to make, and none runs. Each
        # still gets a result, as every call the caller saw begin does.
        events = [not_run(call, "the model's turn was stopped (refusal)") for call in calls]
        state.open_calls = {}
        calls = []
    if calls or state.control.inbox.has_inputs:
        return events, calls  # with none, steering came while the model answered: the answer to it is what counts
    totals = state.totals
    events.append(
        FinalResponse(
            text=bounded_answer("".join([b["text"] for b in answer if b["type"] == "text"])),  # a list: cheaper to join
            stop_reason=end.stop_reason,
            turns=turn,
            tool_calls=totals.tool_calls,
            input_tokens=totals.input_tokens,
            output_tokens=totals.output_tokens,
            duration_s=clock() - state.started,
        )
    )
    return events, None


# The answer in `final_response` is the last turn's text (all of a paused one), in one message: past this it is cut,
# so that the event stays well inside the 4 MiB a gRPC client accepts by default (an outside finding: a 5 MiB answer
# failed the caller's stream with RESOURCE_EXHAUSTED). Its text deltas carry all of it.
ANSWER_BYTES = 1 << 20
ANSWER_CUT = "\n[cut: the answer is longer than 1 MiB; its text_delta events carry all of it]"


def bounded_answer(text: str) -> str:
    if len(text) <= ANSWER_BYTES // 4:  # no character takes more than 4 bytes: no need to encode to know
        return text
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) <= ANSWER_BYTES:
        return text
    return raw[:ANSWER_BYTES].decode("utf-8", "ignore") + ANSWER_CUT


def replayed(turn: int, end: m.TurnEnd, state: LoopState, journal: Journal) -> Usage | None:
    """A turn a durable run recorded before a crash, counted again: the steering its request read goes in again, and
    its `Usage` event comes back only if it never reached the log (its other events are there already)."""
    steered(state, journal.steered(turn))
    if journal.unlogged(f"turn:{turn}"):
        return counted(turn, end, state.totals)
    state.totals.input_tokens += end.input_tokens
    state.totals.output_tokens += end.output_tokens
    return None


def check_budgets(spec: RunSpec, totals: Totals, new_calls: int, control: RunControl) -> None:
    """Before a turn's tool calls start: refuse them when a per-run limit or the deadline says they cannot run."""
    if spec.max_tool_calls is not None and totals.tool_calls + new_calls > spec.max_tool_calls:
        raise BudgetExceeded(
            f"the model asked for {new_calls} more tool call(s) after {totals.tool_calls}; "
            f"max_tool_calls={spec.max_tool_calls}"
        )
    if spec.max_output_tokens is not None and totals.output_tokens > spec.max_output_tokens:
        raise BudgetExceeded(
            f"the run produced {totals.output_tokens} output tokens; max_output_tokens={spec.max_output_tokens}"
        )
    remaining = control.remaining()
    if remaining is not None and remaining < control.min_tool_budget_s:
        raise DeadlineExceeded(f"not starting {new_calls} tool call(s): only {max(remaining, 0):.3f} s left")


def stop_if_asked(control: RunControl) -> None:
    """At the end of a turn: raise the reason the run was asked to stop after it, if it was."""
    after_turn = control.after_turn_reason()
    if after_turn is not None:
        raise after_turn


def counted(turn: int, end: m.TurnEnd, totals: Totals) -> Usage:
    """A model turn's tokens added to the run's totals, and the `Usage` event that says so."""
    totals.input_tokens += end.input_tokens
    totals.output_tokens += end.output_tokens
    tally.add(telemetry.TOKENS_IN, end.input_tokens)
    tally.add(telemetry.TOKENS_OUT, end.output_tokens)
    return Usage(
        turn=turn,
        input_tokens=end.input_tokens,
        output_tokens=end.output_tokens,
        total_input_tokens=totals.input_tokens,
        total_output_tokens=totals.output_tokens,
    )


def tool_calls_of(end: m.TurnEnd) -> list[ToolCallRequest]:
    return [
        ToolCallRequest(call_id=b["id"], name=b["name"], input=b["input"], parse_error=end.bad_inputs.get(b["id"]))
        for b in end.content
        if b["type"] == "tool_use"
    ]


def not_run(call: ToolCallRequest, why: str) -> ToolResult:
    """The result of a call the loop did not run."""
    return ToolResult(
        call_id=call.call_id,
        name=call.name,
        status=ToolStatus.REJECTED,
        duration_s=0.0,
        error=f"not run: {why}",
        attempts=0,
    )


def tool_result_block(result: ToolResult) -> dict[str, Any]:
    """What the model reads: the data as JSON, or the error; a partial result says it is partial."""
    if result.status is ToolStatus.OK and result.answered_by:  # the model should know whose answer it reads
        body = json.dumps({"answered_by": result.answered_by, "data": result.data})
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": body}
    if result.status is ToolStatus.OK:
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": json.dumps(result.data)}
    if result.status is ToolStatus.PARTIAL:
        body = json.dumps({"partial": True, "note": result.error, "data": result.data})
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": body}
    if result.status is ToolStatus.OUTCOME_UNKNOWN:  # not a failure to work around: a side effect to check first
        text = m.plain_text(f"outcome unknown: {result.error}")
        return {"type": "tool_result", "tool_use_id": result.call_id, "content": text, "is_error": True}
    if result.status is ToolStatus.DENIED:  # already says it: "denied by <who>: <reason>"
        return {
            "type": "tool_result",
            "tool_use_id": result.call_id,
            "content": m.plain_text(result.error),
            "is_error": True,
        }
    # a tool's error may quote what it was given or read (a remote body, a program's stderr): it goes back as UTF-8
    text = m.plain_text(f"{result.status.value}: {result.error}")
    return {"type": "tool_result", "tool_use_id": result.call_id, "content": text, "is_error": True}
