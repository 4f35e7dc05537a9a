"""Hostile model output, generated: the real service (gRPC, registry, loop, executor, protobuf conversion) with the
real Claude adapter and SDK, against `FakeAnthropic` playing streams no real model should send: tool inputs nested
past any parser, numbers beyond a double, lone surrogate escapes, odd keys, JSON that is not an object or not
finished; blocks out of order, stops missing, deltas for blocks that never started, errors mid-stream.

Whatever comes, the run ends with a final response or a status that says what happened (never INTERNAL), every
tool call the caller saw begin gets exactly one result, and every request the service sends back is JSON the API
takes. Derandomized and bounded (`fuzz` in test_fuzz.py): the same examples on every run, a few seconds in all.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict
from test_fuzz import fuzz, outcome

from agent.v1 import agent_pb2 as pb
from conftest import make_config, stub
from fake_anthropic import FakeAnthropic
from fake_tools import Echo
from service.models.anthropic import AnthropicModel
from service.rpc.server import Service
from service.wiring import start
from tools.base import JSON, Tool


class AnyInput(BaseModel):
    model_config = ConfigDict(extra="allow")


class Anything(Tool[AnyInput]):
    """Takes any object, so that odd inputs the adapter lets through reach `tool_call_ready` and its Struct."""

    name = "anything"
    description = "Takes anything."
    Input = AnyInput

    async def run(self, args: AnyInput) -> JSON:
        return {"keys": len(args.model_extra or {})}


@pytest.fixture
async def service(fake: FakeAnthropic, tmp_path: Path) -> AsyncIterator[Service]:
    model = AnthropicModel(api_key="test-key", base_url=fake.base_url, timeout_s=5)
    retry = {"attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.002}
    config = make_config(tmp_path, model={"retry": retry})
    tools: dict[str, Tool[Any]] = {"echo": Echo(), "anything": Anything()}
    svc = await start(config, metrics=False, tools=tools, model=model)
    yield svc
    await svc.server.stop(0)
    await svc.close()


# Tool inputs, as the raw JSON text the model streams.

# Odd values the API takes back, mostly, so that many calls reach the tools; and ones it cannot.
STRINGS = st.sampled_from(
    ['"a"', '""', '"\\ud83d\\ude00"', '"\\u0000"', '"' + "k" * 300 + '"', '"\\"\\\\"', '"é\\n"']
    + ['"\\ud800"', '"\\udfff x"']
)
NUMBERS = st.sampled_from(
    ["0", "-1", "1.5", "1e308", "1e-400", "9" * 400, "-0.0"]
    + ["1e400", "-1e400", "NaN", "Infinity", "-Infinity", "9" * 5000]
)
DEPTHS = st.sampled_from([1, 2, 31, 33, 99, 100, 101, 1000, 5000])


@st.composite
def nested(draw: st.DrawFn) -> str:
    depth = draw(DEPTHS)
    open_, close = draw(st.sampled_from([("[", "]"), ('{"k":', "}")]))
    return open_ * depth + draw(NUMBERS | STRINGS) + close * depth


VALUES = st.recursive(
    NUMBERS | STRINGS | st.sampled_from(["true", "false", "null"]) | nested(),
    lambda inner: (
        st.builds(lambda items: "[" + ",".join(items) + "]", st.lists(inner, max_size=3))
        | st.builds(
            lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}",
            st.lists(st.tuples(STRINGS, inner), max_size=3),
        )
    ),
    max_leaves=6,
)


@st.composite
def raw_inputs(draw: st.DrawFn) -> str:
    """An object of odd keys and values (mostly), or JSON that is not an object, or text cut short or empty."""
    pairs = draw(st.lists(st.tuples(STRINGS | st.just('"text"'), VALUES), max_size=4))
    text = "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"
    shape = draw(st.sampled_from(["object"] * 4 + ["other", "cut", "empty"]))
    if shape == "other":
        return draw(VALUES)
    if shape == "cut":
        return text[: draw(st.integers(0, max(0, len(text) - 1)))]
    if shape == "empty":
        return draw(st.sampled_from(["", "  "]))
    return text


# Event shapes.

ERROR_TYPES = ["overloaded_error", "api_error", "invalid_request_error", "authentication_error", "mystery_error"]
STOP_REASONS = [
    "end_turn",
    "tool_use",
    "max_tokens",
    "pause_turn",
    "refusal",
    "model_context_window_exceeded",
    None,
    "brand_new_reason",
]


def delta(index: int, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": body}


@st.composite
def block_events(draw: st.DrawFn, index: int) -> list[tuple[str, dict[str, Any]]]:
    kind = draw(st.sampled_from(["text", "tool_use", "tool_use", "tool_use", "thinking", "other"]))
    events: list[tuple[str, dict[str, Any]]] = []
    if kind == "other":  # complete at its start, passed back as it came: redacted thinking, or a type not known yet
        data = draw(STRINGS | nested())
        start = json.loads(f'{{"type": "{draw(st.sampled_from(["redacted_thinking", "mystery_block"]))}", "data": 0}}')
        start["data"] = json.loads(data) if len(data) < 1000 else data
        deltas = []
    elif kind == "tool_use":
        name = draw(st.sampled_from(["echo", "anything", "anything", "anything", "nope"]))
        # now and then an id the API never sends: the first block's again, or one with a lone surrogate
        call_id = draw(st.sampled_from([f"toolu_{index}"] * 6 + ["toolu_0", "toolu_\\udc00"]))
        start = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
        raw = draw(raw_inputs())
        cuts = sorted(draw(st.lists(st.integers(0, len(raw)), max_size=3)))
        pieces = [raw[a:b] for a, b in zip([0, *cuts], [*cuts, len(raw)], strict=True)]
        deltas = [delta(index, {"type": "input_json_delta", "partial_json": p}) for p in ["", *pieces]]
    elif kind == "text":
        start = {"type": "text", "text": ""}
        deltas = [delta(index, {"type": "text_delta", "text": t}) for t in draw(st.lists(st.text(max_size=5)))]
    else:
        start = {"type": "thinking", "thinking": "", "signature": ""}
        deltas = [delta(index, {"type": "thinking_delta", "thinking": "hmm"})]
        deltas.append(delta(index, {"type": "signature_delta", "signature": "sig"}))
    events.append(("content_block_start", {"type": "content_block_start", "index": index, "content_block": start}))
    events.extend(deltas)
    events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
    return events


@st.composite
def turns(draw: st.DrawFn) -> tuple[list[tuple[str, Any]], set[str]]:
    """A turn's events after message_start, mostly well formed, sometimes not; and the error types it carries."""
    events: list[tuple[str, Any]] = []
    for index in range(draw(st.integers(0, 3))):
        events.extend(draw(block_events(index)))
    stop = draw(st.sampled_from(STOP_REASONS))
    events.append(
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": stop}, "usage": {"output_tokens": 5}})
    )
    events.append(("message_stop", {"type": "message_stop"}))
    errors: set[str] = set()
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 2]))):  # mostly well formed
        at = draw(st.integers(0, len(events)))
        mutation = draw(st.sampled_from(["drop", "swap", "unknown", "stray_delta", "error", "garbage"]))
        if mutation == "drop" and at < len(events):
            del events[at]
        elif mutation == "swap" and at + 1 < len(events):
            events[at], events[at + 1] = events[at + 1], events[at]
        elif mutation == "unknown":
            events.insert(at, ("mystery_event", {"type": "mystery_event", "x": 1}))
        elif mutation == "stray_delta":
            events.insert(at, delta(7, {"type": "text_delta", "text": "stray"}))
        elif mutation == "error":
            error_type = draw(st.sampled_from(ERROR_TYPES))
            errors.add(error_type)
            events.insert(at, ("error", {"type": "error", "error": {"type": error_type, "message": "boom"}}))
        elif mutation == "garbage":
            events.insert(at, ("content_block_delta", draw(st.sampled_from(["<html>502</html>", "{", "[" * 3000]))))
    return events, errors


def allowed_codes(errors: set[str]) -> set[grpc.StatusCode]:
    """What a run may end with: the model's side (UNAVAILABLE), pause_turn round after round (RESOURCE_EXHAUSTED),
    and what an `error` event in the stream says of the request or of the server's credentials."""
    codes = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    if "invalid_request_error" in errors:
        codes.add(grpc.StatusCode.INVALID_ARGUMENT)
    if "authentication_error" in errors:
        codes.add(grpc.StatusCode.FAILED_PRECONDITION)
    return codes


async def test_any_model_output_ends_a_run_clearly_and_every_tool_call_gets_a_result(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    agent = stub(channel_to(service))

    async def check(turn: tuple[list[tuple[str, Any]], set[str]]) -> None:
        events_of_turn, errors = turn
        fake.clear()
        fake.requests.clear()
        fake.script_events(events_of_turn)
        for _ in range(4):  # for a retry and the turns after tool calls
            fake.script_turn(text="Done.")
        request = pb.RunAgentRequest(message="go", tools=["echo", "anything"], max_turns=3)
        events, err = await outcome(agent.RunAgent(request, timeout=20))

        kinds = [e.WhichOneof("event") for e in events]
        if err is None:
            assert kinds[-1] == "final_response"
        else:
            assert err.code() in allowed_codes(errors), f"{err.code()}: {err.details()}"
            assert err.details() and events[-1].error.code == err.code().name
            assert events[-1].error.retryable is (err.code() == grpc.StatusCode.UNAVAILABLE)
        begun = [e.tool_call.call_id for e in events if e.HasField("tool_call")]
        ended = [e.tool_result.call_id for e in events if e.HasField("tool_result")]
        assert sorted(begun) == sorted(ended), (kinds, begun, ended)
        ready = [e.tool_call_ready.call_id for e in events if e.HasField("tool_call_ready")]
        assert set(ready) <= set(ended)
        for sent in fake.requests:  # the fake answers 400 to a body that is not JSON the API takes
            assert sent.body, "a request the API would refuse as not JSON"
            json.dumps(sent.body, allow_nan=False, ensure_ascii=False).encode()
            for message in sent.body["messages"]:
                for block in message["content"]:
                    if block["type"] == "tool_use":
                        assert isinstance(block["input"], dict)

    await fuzz(check, examples=60, turn=turns())
