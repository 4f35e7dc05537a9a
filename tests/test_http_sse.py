"""The SSE framing and the direct JSON of deltas, checked against protobuf's own JSON mapping."""

from __future__ import annotations

import json

import pytest
from google.protobuf import json_format

from service import events as ev
from service.http.sse import comment, frame, timestamp
from service.rpc.convert import to_proto
from service.run import Entry

TIMES = [1_764_739_905_000_000_000, 1_764_739_905_123_000_000, 1_764_739_905_123_456_000, 1_764_739_905_123_456_789]


@pytest.mark.parametrize("time_ns", TIMES)
@pytest.mark.parametrize(
    "event",
    [
        ev.TextDelta(turn=1, text='Hello, "world"\n\t€ 🚚 \\'),
        ev.TextDelta(turn=0, text=""),
        ev.Thinking(turn=3, text="hmm\u2028"),
        ev.TextDelta(turn=2, text="half an emoji: \ud83d"),  # a lone surrogate: protobuf's path, scrubbed
    ],
)
@pytest.mark.parametrize("first_seq", [0, 3])
def test_deltas_are_written_as_protobuf_writes_them(event: ev.Event, time_ns: int, first_seq: int) -> None:
    entry = Entry(seq=7, time_ns=time_ns, event=event, first_seq=first_seq)
    lines = frame(entry, "run_x").decode().split("\n")
    assert lines[:2] == ["id: 7", f"event: {event.kind}"] and lines[3:] == ["", ""]
    expected = json_format.MessageToDict(to_proto(event, "run_x", 7, time_ns=time_ns, first_seq=first_seq))
    assert json.loads(lines[2].removeprefix("data: ")) == expected


@pytest.mark.parametrize("time_ns", TIMES)
def test_timestamps_are_written_as_protobuf_writes_them(time_ns: int) -> None:
    expected = to_proto(ev.TextDelta(turn=1, text="x"), "r", 1, time_ns=time_ns).time.ToJsonString()
    assert timestamp(time_ns) == expected


def test_other_events_go_through_protobufs_mapping() -> None:
    event = ev.ToolCall(turn=1, call_id="c1", name="echo")
    data = frame(Entry(seq=2, time_ns=TIMES[1], event=event), "run_x").decode().split("\n")[2]
    assert json.loads(data.removeprefix("data: "))["toolCall"] == {"turn": 1, "callId": "c1", "name": "echo"}


def test_a_comment_stays_one_line() -> None:
    assert comment("dropped\nresume") == b": dropped resume\n\n"
