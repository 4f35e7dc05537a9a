"""Tool data and tool inputs as protobuf: whatever a tool or the model sends, the event can be built and read, both
here and over real gRPC (stream, replay, unary answer)."""

from __future__ import annotations

import collections
import datetime
import decimal
import enum
import json
import math
import types
from typing import Any

from google.protobuf import duration_pb2, json_format, struct_pb2
from pydantic import BaseModel

from agent.v1 import agent_pb2 as pb
from conftest import run_events, stub
from fake_tools import all_tools
from service import events as ev
from service.control import RunControl
from service.loop import RunSpec
from service.redact import TOO_DEEP
from service.rpc.convert import run_result, to_proto
from service.rpc.values import MAX_DEPTH, struct
from service.run import Run
from tools.base import JSON, Tool

BIG = 10**400  # beyond a double's range: float(BIG) raises OverflowError


def result_data(data: Any) -> struct_pb2.Value:
    """`data` as a client reads it: built into a tool_result event, sent, parsed."""
    event = ev.ToolResult(call_id="c", name="t", status=ev.ToolStatus.OK, duration_s=0.1, data=data)
    return pb.AgentEvent.FromString(to_proto(event, "run_x", 1).SerializeToString()).tool_result.data


def plain(value: struct_pb2.Value) -> Any:
    return json_format.MessageToDict(value)


def nested(depth: int, leaf: Any = 1) -> Any:
    """`depth` dicts, one inside the other: the costliest nesting for protobuf (three levels each)."""
    value = leaf
    for _ in range(depth):
        value = {"a": value}
    return value


def test_json_converts_as_protobuf_itself_converts_it() -> None:
    data = {
        "s": "text",
        "i": 42,
        "f": 1.5,
        "t": True,
        "n": None,
        "large": 2**63,
        "items": [{"sku": "A", "qty": 2}, [], {}, [1, [2, [3]]]],
        "empty": {},
    }
    assert result_data(data) == json_format.ParseDict(data, struct_pb2.Value())
    expected = struct_pb2.Struct()
    expected.update(data)
    assert struct(data) == expected
    ready = to_proto(ev.ToolCallReady(call_id="c", name="t", input={}), "run_x", 1).tool_call_ready
    assert ready.HasField("input")  # an empty input is still sent


def test_ints_beyond_a_double_become_decimal_strings() -> None:
    assert plain(result_data({"id": BIG, "neg": -BIG, "max": 2**1023})) == {
        "id": str(BIG),
        "neg": str(-BIG),
        "max": float(2**1023),  # a double can hold it: still a number
    }
    assert plain(result_data(BIG)) == str(BIG)
    assert plain(result_data(10**5000)) == hex(10**5000)  # past Python's 4300-digit limit on decimal conversion
    assert json_format.MessageToDict(struct({"n": BIG})) == {"n": str(BIG)}
    chunk = to_proto(ev.ToolResultChunk(call_id="c", index=0, total=None, data=[BIG]), "run_x", 1).tool_result_chunk
    assert plain(chunk.data) == [str(BIG)] and not chunk.HasField("total")


def test_nan_and_infinities_become_their_protobuf_json_spellings() -> None:
    data = result_data({"nan": math.nan, "inf": math.inf, "ninf": -math.inf})
    assert plain(data) == {"nan": "NaN", "inf": "Infinity", "ninf": "-Infinity"}
    json_format.MessageToJson(data)  # numbers NaN and inf would make this raise: a JSON client could not read them


def test_keys_and_values_that_are_not_json_are_written_as_text() -> None:
    class Color(enum.IntEnum):
        RED = 1

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no")

    data = {
        "keys": {2: "int", None: "none", True: "bool", 1.5: "float", (1, 2): "tuple", BIG: "big"},
        "values": [b"ab", {1}, datetime.date(2026, 1, 2), decimal.Decimal("1.5"), Color.RED, (1, "2"), Unprintable()],
        "mappings": [collections.OrderedDict(a=1), types.MappingProxyType({"b": 2})],
    }
    assert plain(result_data(data)) == {
        "keys": {"2": "int", "null": "none", "true": "bool", "1.5": "float", "(1, 2)": "tuple", str(BIG): "big"},
        "values": ["b'ab'", "{1}", "2026-01-02", "1.5", 1.0, [1.0, "2"], "<Unprintable>"],
        "mappings": [{"a": 1.0}, {"b": 2.0}],
    }


def test_nesting_deeper_than_clients_can_parse_is_sent_as_json_text() -> None:
    # MAX_DEPTH dicts, the deepest nesting sent as structure, still parse at the client in the deepest message
    # that carries tool data: RunResult → ToolCallRecord → ToolResult → Value
    deepest = nested(MAX_DEPTH)
    assert plain(result_data(deepest)) == deepest
    spec = RunSpec(run_id="run_x", message="m", model="m", system=None, max_turns=1, max_tokens=1, tools=("t",))
    run = Run(spec, RunControl(), caller="", key="", fingerprint="")
    run.append(ev.ToolCall(turn=1, call_id="c", name="t"))
    run.append(ev.ToolCallReady(call_id="c", name="t", input=nested(MAX_DEPTH)))
    run.append(ev.ToolResult(call_id="c", name="t", status=ev.ToolStatus.OK, duration_s=0.1, data=deepest))
    record = pb.RunResult.FromString(run_result(run).SerializeToString()).tool_calls[0]
    assert plain(record.result.data) == deepest and json_format.MessageToDict(record.input) == nested(MAX_DEPTH)

    # one more: the innermost dict arrives as its JSON text
    data = plain(result_data(nested(MAX_DEPTH + 1, leaf=[BIG])))
    for _ in range(MAX_DEPTH):
        data = data["a"]
    assert json.loads(data) == {"a": [BIG]}

    # far deeper than json.dumps goes, or circular: the marker, and no exception
    circular: dict[str, Any] = {}
    circular["self"] = circular
    for value in (nested(5000), circular):
        data = plain(result_data(value))
        for _ in range(MAX_DEPTH):
            data = data["a" if "a" in data else "self"]
        assert data == TOO_DEEP


class BigInput(BaseModel):
    value: Any = None


class Big(Tool[BigInput]):
    """Returns an id too large for a double, as `http_request` does for a remote body holding one."""

    name = "big"
    description = "Returns a big id and what it was given."
    Input = BigInput

    async def run(self, args: BigInput) -> JSON:
        return {"id": BIG, "given": args.value}


async def test_a_huge_int_from_a_tool_or_the_model_reaches_every_reader(start_service: Any, channel_to: Any) -> None:
    turns = [{"tool_calls": [{"name": "big", "input": {"value": -BIG}}]}, {"text": "done"}]
    svc = await start_service(turns, tools={**all_tools(), "big": Big()})
    channel = channel_to(svc)

    streamed = await run_events(channel, message="go", tools=["big"])
    assert streamed[-1].HasField("final_response")
    (ready,) = [e.tool_call_ready for e in streamed if e.HasField("tool_call_ready")]
    assert json_format.MessageToDict(ready.input) == {"value": str(-BIG)}
    (result,) = [e.tool_result for e in streamed if e.HasField("tool_result")]
    assert plain(result.data) == {"id": str(BIG), "given": str(-BIG)}

    replayed = [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=streamed[0].run_id))]
    assert replayed == streamed

    unary = await stub(channel).RunAgentUnary(pb.RunAgentRequest(message="go", tools=["big"]))
    assert plain(unary.tool_calls[0].result.data) == {"id": str(BIG), "given": str(-BIG)}
    assert unary.final_response.text == "done"


def test_lone_surrogates_become_replacement_characters_instead_of_raising() -> None:
    """json.loads reads the escape "\\ud83d" (half an emoji) into a str that UTF-8 cannot encode; protobuf refused it
    and the stream ended. Values, keys, deep data and plain text fields are all cleaned."""
    half = "\ud83d"
    data = {"name": f"{half} x", f"{half}k": [1, {"deep": half}]}
    result = ev.ToolResult(call_id="c", name="t", status=ev.ToolStatus.OK, duration_s=0.1, data=data)
    out = to_proto(result, "run_1", 5)
    fields = out.tool_result.data.struct_value.fields
    assert fields["name"].string_value == "\ufffd x"
    assert fields["\ufffdk"].list_value.values[1].struct_value.fields["deep"].string_value == "\ufffd"
    assert to_proto(ev.TextDelta(turn=1, text=f"a{half}b"), "run_1", 6).text_delta.text == "a\ufffdb"
    assert struct({half: half})["\ufffd"] == "\ufffd"


def test_run_recovered_reaches_the_wire() -> None:
    event = ev.RunRecovered(step_no=4, turn=1, seq=17, reason="its process stopped")
    wire = pb.AgentEvent.FromString(to_proto(event, "run_x", 18).SerializeToString())
    assert wire.WhichOneof("event") == "run_recovered"
    e = wire.run_recovered
    assert (e.step_no, e.turn, e.seq, e.reason) == (4, 1, 17, "its process stopped")


def test_usage_and_final_response_reach_the_wire_whole_even_with_every_field_zero() -> None:
    usage = ev.Usage(turn=2, input_tokens=10, output_tokens=20, total_input_tokens=30, total_output_tokens=40)
    final = ev.FinalResponse(
        text="done", stop_reason="end_turn", turns=2, tool_calls=1, input_tokens=30, output_tokens=40, duration_s=1.25
    )
    expected = {
        "usage": pb.Usage(turn=2, input_tokens=10, output_tokens=20, total_input_tokens=30, total_output_tokens=40),
        "final_response": pb.FinalResponse(
            text="done", stop_reason="end_turn", turns=2, tool_calls=1, input_tokens=30, output_tokens=40
        ),
    }
    expected["final_response"].duration.FromNanoseconds(1_250_000_000)
    for event in (usage, final):
        wire = pb.AgentEvent.FromString(to_proto(event, "run_x", 3).SerializeToString())
        assert getattr(wire, wire.WhichOneof("event")) == expected[event.kind]
    zero_usage = ev.Usage(turn=0, input_tokens=0, output_tokens=0, total_input_tokens=0, total_output_tokens=0)
    zero_final = ev.FinalResponse(
        text="", stop_reason="", turns=0, tool_calls=0, input_tokens=0, output_tokens=0, duration_s=0.0
    )
    for event in (zero_usage, zero_final):
        wire = pb.AgentEvent.FromString(to_proto(event, "run_x", 3).SerializeToString())
        assert wire.WhichOneof("event") == event.kind  # the event is there though each of its fields is a default


def test_durations_are_set_as_protobuf_sets_them_from_nanoseconds_negative_ones_too() -> None:
    for seconds in (0.0, 1.25, 0.000_000_5, 86_400.75, -0.5, -1.25, -3.0):
        event = ev.FinalResponse(
            text="", stop_reason="", turns=0, tool_calls=0, input_tokens=0, output_tokens=0, duration_s=seconds
        )
        expected = duration_pb2.Duration()
        expected.FromNanoseconds(int(seconds * 1e9))
        assert to_proto(event, "run_x", 3).final_response.duration == expected, seconds
