"""Events survive the trip through JSON that the shared stores make: every kind, unchanged."""

from __future__ import annotations

import dataclasses
import json

import pytest

from service import codec
from service import events as ev

SAMPLES: list[ev.Event] = [
    ev.RunStarted(model="m", tools=("echo", "search"), max_turns=3),
    ev.Thinking(turn=1, text="hmm"),
    ev.TextDelta(turn=1, text="héllo 😀"),
    ev.ToolCall(turn=1, call_id="c1", name="echo"),
    ev.ToolCallDelta(call_id="c1", partial_json='{"te'),
    ev.ToolCallReady(call_id="c1", name="echo", input={"text": "hi", "n": [1, 2.5, None]}),
    ev.ToolResultChunk(call_id="c1", index=0, total=None, data={"rows": [[1, "a"]]}),
    ev.ToolDataPart(call_id="c1", index=0, total=2, json='{"a":'),
    ev.ToolRetry(call_id="c1", attempt=1, max_attempts=3, wait_s=0.5, error="boom"),
    ev.ModelRetry(turn=1, attempt=1, max_attempts=3, wait_s=0.5, error="overloaded"),
    ev.RunRecovered(step_no=4, turn=1, seq=17, reason="its process stopped"),
    ev.ToolFallback(call_id="c1", primary="a", fallback="b", reason="open"),
    ev.ExecutionFailed(execution_id="exec_1", call_id="c1", tool="echo", message="x"),
    ev.ToolResult(call_id="c1", name="echo", status=ev.ToolStatus.PARTIAL, duration_s=0.25, data=[1], attempts=2),
    ev.ApprovalRequired(
        call_id="c1", name="echo", input={"amount": 5}, reason="rule", deadline=1.5e9, approvers=("a", "b")
    ),
    ev.ApprovalDecided(call_id="c1", approved=True, decided_by="a", reason="ok", edited_input={"amount": 4}),
    ev.InputReceived(text="use last quarter", when="asap", sent_by="a"),
    ev.Usage(turn=1, input_tokens=1, output_tokens=2, total_input_tokens=3, total_output_tokens=4),
    ev.FinalResponse(
        text="done", stop_reason="end_turn", turns=1, tool_calls=1, input_tokens=1, output_tokens=2, duration_s=1.5
    ),
    ev.RunFailed(code="CANCELLED", message="stop", retryable=False),
]


def test_every_kind_is_sampled() -> None:
    assert {type(e) for e in SAMPLES} == set(ev.Event.__args__)  # type: ignore[attr-defined]


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_an_event_comes_back_equal(event: ev.Event) -> None:
    back = codec.loads(codec.dumps(event))
    assert back == event
    assert type(back) is type(event)


def test_an_unknown_kind_or_field_is_refused_loudly() -> None:
    with pytest.raises(ValueError, match="unknown event kind"):
        codec.loads(b'{"kind": "telepathy"}')
    with pytest.raises(ValueError, match="bad text_delta"):
        codec.loads(b'{"kind": "text_delta", "turn": 1, "text": "x", "colour": "red"}')
    with pytest.raises(ValueError, match="JSON object"):
        codec.loads(b"[1]")


def test_packed_events_come_back_equal_and_in_order() -> None:
    """The run log's form: stretches of same-kind, same-turn deltas as one element; anything else as one each."""
    deltas = [ev.TextDelta(turn=2, text=t) for t in ("a", "", "b😀")]
    events = [*SAMPLES, *deltas, ev.Thinking(turn=2, text="x"), ev.TextDelta(turn=3, text="c"), *SAMPLES[:3]]
    raw = codec.dumps_packed(events)
    assert codec.loads_packed(raw) == events
    assert [type(e) for e in codec.loads_packed(raw)] == [type(e) for e in events]
    assert raw.count(b'"texts"') == 7  # SAMPLES's 2, the 3 deltas as one, thinking, turn 3, SAMPLES[:3]'s 2
    assert codec.loads_packed(codec.dumps_many(events)) == events  # rows written before: read as ever


def _stdlib(value: object) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: e.kind)
def test_the_encoding_is_the_one_the_standard_library_wrote(event: ev.Event) -> None:
    """A replica of the previous version (the standard library's encoder) reads what this one writes and wrote the
    same bytes: the dicts match, keys in order, and so does their JSON."""
    assert codec.dumps(event) == _stdlib(codec.to_dict(event))
    assert list(codec.to_dict(event)) == ["kind", *(f.name for f in dataclasses.fields(event))]


def test_tool_data_that_orjson_refuses_or_reads_differently_comes_back_exact() -> None:
    """Integers past 64 bits (the standard library writes and reads them exactly); integer keys become strings, as
    they did."""
    data = {"big": 2**70, "neg": -(2**64), 7: ["x", (1, 2)]}
    event = ev.ToolResult(call_id="c", name="n", status=ev.ToolStatus.OK, duration_s=0.1, data=data)
    back = codec.loads(codec.dumps(event))
    assert isinstance(back, ev.ToolResult)
    assert back.data == {"big": 2**70, "neg": -(2**64), "7": ["x", [1, 2]]}
    assert codec.loads_packed(codec.dumps_many([event]))[0] == back
