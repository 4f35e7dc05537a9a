"""The Claude adapter end to end: the real SDK against `FakeAnthropic`, a local server speaking the streaming
protocol."""

from __future__ import annotations

import asyncio
import email.utils
import json
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import ValidationError

from fake_anthropic import FakeAnthropic, Text, ToolUse
from service.config import ModelConfig
from service.errors import ModelError
from service.models.anthropic import AnthropicModel, _Turn
from service.models.base import (
    ModelEvent,
    TextDelta,
    ThinkingDelta,
    ToolSpec,
    ToolUseDelta,
    ToolUseStart,
    TurnEnd,
    TurnRequest,
)

MODEL = "claude-sonnet-4-6"  # not one the SDK flags as deprecated: its warning would fail the test
QUERY_TOOL = ToolSpec(
    name="query_database",
    description="Run a read-only SQL query.",
    input_schema={"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"]},
)


@pytest.fixture
async def model(fake: FakeAnthropic) -> AsyncIterator[AnthropicModel]:
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, default_model=MODEL, timeout_s=5.0)
    yield claude
    await claude.aclose()


def request(**overrides: Any) -> TurnRequest:
    fields: dict[str, Any] = {
        "model": MODEL,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "How many orders?"}]}],
        "tools": [QUERY_TOOL],
        "max_tokens": 1024,
    }
    return TurnRequest(**(fields | overrides))


async def collect(model: AnthropicModel, turn: TurnRequest | None = None) -> list[ModelEvent]:
    return [event async for event in model.stream_turn(turn or request())]


async def failure(model: AnthropicModel) -> tuple[ModelError, list[ModelEvent]]:
    """The ModelError a turn ends with, and the events that came before it."""
    events: list[ModelEvent] = []
    with pytest.raises(ModelError) as info:
        async for event in model.stream_turn(request()):
            events.append(event)
    return info.value, events


async def test_text_turn(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_turn(text="There are 42 orders.", input_tokens=31, output_tokens=9)

    events = await collect(model)

    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) > 1
    assert "".join(d.text for d in deltas) == "There are 42 orders."
    assert events[-1] == TurnEnd(
        stop_reason="end_turn",
        content=[{"type": "text", "text": "There are 42 orders."}],
        input_tokens=31,
        output_tokens=9,
    )
    assert sum(isinstance(e, TurnEnd) for e in events) == 1


async def test_events_arrive_as_streamed(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_turn(text=["one ", "two ", "three"], delay=0.03)
    loop = asyncio.get_running_loop()

    stamps = [(event, loop.time()) async for event in model.stream_turn(request())]

    first_text = next(t for e, t in stamps if isinstance(e, TextDelta))
    assert stamps[-1][1] - first_text >= 0.1  # yielded as it came, not after the whole reply


async def test_request_sent(fake: FakeAnthropic) -> None:
    fake.script_turn(text="ok")
    claude = AnthropicModel(api_key="secret-key", base_url=fake.base_url, thinking_budget=2048)
    try:
        await collect(claude, request(max_tokens=4096))
    finally:
        await claude.aclose()

    sent = fake.last_request
    assert sent.path == "/v1/messages"
    assert sent.api_key == "secret-key"
    assert sent.headers["x-stainless-retry-count"] == "0"
    assert sent.body["model"] == MODEL
    assert sent.body["system"] == "You are terse."
    assert sent.body["max_tokens"] == 4096
    assert sent.body["stream"] is True
    assert sent.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "How many orders?"}]}]
    assert sent.body["tools"] == [
        {"name": QUERY_TOOL.name, "description": QUERY_TOOL.description, "input_schema": QUERY_TOOL.input_schema}
    ]
    assert sent.body["thinking"] == {"type": "enabled", "budget_tokens": 2048}


@pytest.mark.parametrize(("max_tokens", "thinking"), [(2049, {"type": "enabled", "budget_tokens": 2048}), (2048, None)])
async def test_thinking_only_when_its_budget_fits_below_max_tokens(
    fake: FakeAnthropic, max_tokens: int, thinking: dict[str, Any] | None
) -> None:
    """The API refuses a thinking budget not below max_tokens: a caller's small max_tokens turns the server's
    thinking off for its run rather than failing it with an error about a setting the caller cannot see."""
    fake.script_turn(text="ok")
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, thinking_budget=2048)
    try:
        events = await collect(claude, request(max_tokens=max_tokens))
    finally:
        await claude.aclose()

    assert isinstance(events[-1], TurnEnd)
    assert fake.last_request.body.get("thinking") == thinking


async def test_adaptive_thinking_and_effort_go_as_configured_whatever_max_tokens(fake: FakeAnthropic) -> None:
    """Claude 4.6 and later decide how much to think (manual budgets are deprecated there and Opus 4.7 refuses
    them): no budget to fit below max_tokens, so even a small max_tokens keeps thinking on."""
    fake.script_turn(text="ok")
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, adaptive_thinking=True, effort="low")
    try:
        await collect(claude, request(max_tokens=100))
    finally:
        await claude.aclose()

    assert fake.last_request.body["thinking"] == {"type": "adaptive"}
    assert fake.last_request.body["output_config"] == {"effort": "low"}


def test_the_config_takes_one_kind_of_thinking() -> None:
    assert ModelConfig(thinking="adaptive", effort="high").thinking == "adaptive"
    with pytest.raises(ValidationError, match="model.thinking .adaptive. or model.thinking_budget .manual., not both"):
        ModelConfig(thinking="adaptive", thinking_budget=2048)


async def test_optional_fields_omitted(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_turn(text="ok")

    await collect(model, request(system=None, tools=[]))

    assert {"system", "tools", "thinking", "output_config"}.isdisjoint(fake.last_request.body)


async def test_thinking_with_signature(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_turn(thinking="Count the rows.", signature="sig-123", text="42.")

    events = await collect(model)

    thinking = [e.text for e in events if isinstance(e, ThinkingDelta)]
    assert "".join(thinking) == "Count the rows."
    assert isinstance(events[0], ThinkingDelta)
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert end.content == [
        {"type": "thinking", "thinking": "Count the rows.", "signature": "sig-123"},
        {"type": "text", "text": "42."},
    ]


async def test_tool_use_streamed_in_pieces(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_blocks(
        [
            Text("Let me look."),
            ToolUse("query_database", '{"sql": "select count(*) from orders"}', id="toolu_1", pieces=4),
        ],
        output_tokens=40,
    )

    events = await collect(model)

    tool_events = [e for e in events if isinstance(e, ToolUseStart | ToolUseDelta)]
    assert tool_events[0] == ToolUseStart(call_id="toolu_1", name="query_database")
    pieces = tool_events[1:]
    assert len(pieces) == 4
    assert all(isinstance(p, ToolUseDelta) and p.call_id == "toolu_1" for p in pieces)
    assert "".join(p.partial_json for p in pieces if isinstance(p, ToolUseDelta)) == (
        '{"sql": "select count(*) from orders"}'
    )
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert end.stop_reason == "tool_use"
    assert end.output_tokens == 40
    assert end.bad_inputs == {}
    assert end.content == [
        {"type": "text", "text": "Let me look."},
        {
            "type": "tool_use",
            "id": "toolu_1",
            "name": "query_database",
            "input": {"sql": "select count(*) from orders"},
        },
    ]


async def test_two_tool_uses(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_turn(tool_uses=[("query_database", {"sql": "select 1"}), ("query_database", {"sql": "select 2"})])

    events = await collect(model)

    starts = [e for e in events if isinstance(e, ToolUseStart)]
    assert len(starts) == 2
    assert starts[0].call_id != starts[1].call_id
    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert [(b["id"], b["input"]) for b in end.content] == [
        (starts[0].call_id, {"sql": "select 1"}),
        (starts[1].call_id, {"sql": "select 2"}),
    ]
    # Each delta belongs to the block that was open when it came.
    for start, nxt in zip(starts, starts[1:] + [None], strict=True):
        first = events.index(start)
        last = events.index(nxt) if nxt is not None else len(events) - 1
        assert all(isinstance(e, ToolUseDelta) and e.call_id == start.call_id for e in events[first + 1 : last])


async def test_bad_tool_input(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_blocks(
        [
            ToolUse("query_database", '{"sql": "select', id="toolu_bad"),
            ToolUse("query_database", "[1, 2]", id="toolu_list"),
            ToolUse("query_database", "", id="toolu_empty"),
        ]
    )

    end = (await collect(model))[-1]

    assert isinstance(end, TurnEnd)
    assert [b["input"] for b in end.content] == [{}, {}, {}]
    assert set(end.bad_inputs) == {"toolu_bad", "toolu_list"}
    assert "not valid JSON" in end.bad_inputs["toolu_bad"]
    assert "not an object" in end.bad_inputs["toolu_list"]


@pytest.mark.parametrize("stop_reason", ["max_tokens", "model_context_window_exceeded"])
@pytest.mark.parametrize("cut_input", ["", '{"sql": "select 1"}', '{"sql": "sel'])
async def test_a_tool_use_cut_off_by_the_output_limit_is_a_bad_input(
    fake: FakeAnthropic, model: AnthropicModel, stop_reason: str, cut_input: str
) -> None:
    """The API ends the turn inside the tool_use block it was writing: whatever of its input came (nothing, or JSON
    that happens to parse) is not what the model meant to send, so the call must not run."""
    fake.script_blocks(
        [ToolUse("query_database", {"sql": "select 2"}, id="toolu_whole"), ToolUse("query_database", cut_input)],
        stop_reason=stop_reason,
    )

    end = (await collect(model))[-1]

    assert isinstance(end, TurnEnd)
    whole, cut = end.content
    assert whole["input"] == {"sql": "select 2"}
    assert cut["input"] == {}
    assert list(end.bad_inputs) == [cut["id"]]
    assert end.bad_inputs[cut["id"]] == (
        f"the turn ended ({stop_reason}) before this tool call's input was complete, so the call did not run; "
        "try again with a shorter input"
    )


async def test_empty_text_block_left_out(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_blocks([Text(""), ToolUse("query_database", {"sql": "select 1"}, id="toolu_1")])

    end = (await collect(model))[-1]

    # The API rejects an empty text block when the history is sent back.
    assert isinstance(end, TurnEnd)
    assert [b["type"] for b in end.content] == ["tool_use"]


async def test_pings_ignored(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_blocks([Text(["a", "b", "c", "d", "e", "f", "g"])], pings=True)

    events = await collect(model)

    assert [e.text for e in events if isinstance(e, TextDelta)] == list("abcdefg")
    assert len(events) == 8


@pytest.mark.parametrize(
    ("status", "header", "retryable"), [(500, "false", False), (400, "true", True), (503, "TRUE", True)]
)
async def test_the_apis_x_should_retry_decides_over_the_status(
    fake: FakeAnthropic, model: AnthropicModel, status: int, header: str, retryable: bool
) -> None:
    fake.script_http_error(status, headers={"x-should-retry": header})
    error, _ = await failure(model)
    assert (error.status, error.retryable) == (status, retryable)


@pytest.mark.parametrize(
    ("status", "retryable", "words"),
    [
        (529, True, "overloaded (HTTP 529)"),
        (429, True, "rate limited (HTTP 429)"),
        (500, True, "server error (HTTP 500)"),
        (408, True, "HTTP 408"),
        (409, True, "HTTP 409"),
        (400, False, "invalid request (HTTP 400)"),
        (401, False, "authentication failed (HTTP 401)"),
        (403, False, "HTTP 403"),
        (404, False, "HTTP 404"),
        (413, False, "request too large (HTTP 413)"),
    ],
)
async def test_http_errors(
    fake: FakeAnthropic, model: AnthropicModel, status: int, retryable: bool, words: str
) -> None:
    fake.script_http_error(status)

    error, events = await failure(model)

    assert events == []
    assert error.status == status
    assert error.retryable is retryable
    assert error.message.startswith("anthropic: ")
    assert words in error.message
    assert isinstance(error.__cause__, Exception)
    assert len(fake.requests) == 1  # the SDK did not retry
    assert fake.pending == 0


@pytest.mark.parametrize(
    ("headers", "wait"),
    [
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after-ms": "1500", "retry-after": "2"}, 1.5),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}, None),  # a date in the past: no wait asked for
        ({"retry-after": "soon"}, None),
        ({}, None),
    ],
)
async def test_retry_after(
    fake: FakeAnthropic, model: AnthropicModel, headers: dict[str, str], wait: float | None
) -> None:
    fake.script_http_error(429, headers=headers)

    error, _ = await failure(model)

    assert error.retryable is True
    assert error.retry_after_s == wait


async def test_retry_after_as_a_date(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_http_error(529, headers={"retry-after": email.utils.formatdate(time.time() + 30, usegmt=True)})

    error, _ = await failure(model)

    assert error.retry_after_s is not None and 25 <= error.retry_after_s <= 30


async def test_overload_message(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_http_error(529)

    error, _ = await failure(model)

    assert error.message == "anthropic: overloaded (HTTP 529): Overloaded [request-id req_fake]"


async def test_overloaded_mid_stream(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_stream_error([Text("Partial answer")])

    error, events = await failure(model)

    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Partial answer"
    assert not any(isinstance(e, TurnEnd) for e in events)
    assert error.retryable is True
    assert error.status is None
    assert "overloaded mid-stream" in error.message


async def test_an_error_event_that_is_not_the_apis_json_is_worth_another_try(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    fake.script_events([("error", "upstream connect error or disconnect/reset before headers")])

    error, _ = await failure(model)

    assert error.retryable is True and error.status is None
    assert "upstream connect error" in error.message


async def test_invalid_request_mid_stream_is_final(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_stream_error(error_type="invalid_request_error", message="bad")

    error, _ = await failure(model)

    assert error.retryable is False


async def test_a_delta_for_a_block_that_never_started_is_a_model_error(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    """The upstream broke the protocol: a model failure the run reports as such, not a bug of ours (INTERNAL), and
    worth another try as a gateway's 502 is."""
    delta = {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
    fake.script_events([("content_block_delta", delta)])

    error, events = await failure(model)

    assert events == []
    assert (error.retryable, error.kind) == (True, "malformed")
    assert error.message == "anthropic: malformed stream: a delta for content block 0, which never started"


async def test_stream_cut_short(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_cut([Text("Half")])

    error, events = await failure(model)

    assert error.retryable is True
    assert "before message_stop" in error.message
    assert not any(isinstance(e, TurnEnd) for e in events)


async def test_connection_refused() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # The port is closed now: nothing listens there.
    claude = AnthropicModel(api_key="test-key", base_url=f"http://127.0.0.1:{port}", timeout_s=2.0)
    try:
        error, _ = await failure(claude)
    finally:
        await claude.aclose()

    assert error.retryable is True
    assert error.status is None
    assert error.message.startswith("anthropic: connection failed")


async def test_read_timeout_mid_stream(fake: FakeAnthropic) -> None:
    fake.script_hang([Text("Thinking about it")])
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, timeout_s=0.3)
    try:
        error, events = await failure(claude)
    finally:
        await claude.aclose()

    assert error.retryable is True
    assert "timed out" in error.message
    assert any(isinstance(e, TextDelta) for e in events)


async def test_cancel_drops_connection(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_hang([Text("Let me")])
    started = asyncio.Event()
    seen: list[ModelEvent] = []

    async def consume() -> None:
        async for event in model.stream_turn(request()):
            seen.append(event)
            started.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(started.wait(), 2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    await asyncio.wait_for(fake.disconnected.wait(), 1)
    assert fake.last_request.disconnected
    assert isinstance(seen[0], TextDelta)


async def test_close_generator_drops_connection(fake: FakeAnthropic, model: AnthropicModel) -> None:
    fake.script_hang([Text("Let me")])
    turn = model.stream_turn(request())

    assert isinstance(await anext(turn), TextDelta)
    await turn.aclose()

    await asyncio.wait_for(fake.disconnected.wait(), 1)


async def test_unscripted_request_is_an_error(fake: FakeAnthropic, model: AnthropicModel) -> None:
    error, _ = await failure(model)

    assert error.retryable is False
    assert "no scripted reply" in error.message


async def test_default_model(model: AnthropicModel) -> None:
    assert model.default_model == MODEL
    other = AnthropicModel(api_key="k")
    assert other.default_model == "claude-sonnet-4-6"
    await other.aclose()


async def test_a_bare_timeout_error_is_a_retryable_timeout(
    fake: FakeAnthropic, model: AnthropicModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket or SSL timeout the SDK let through unwrapped, opening the stream or reading it."""

    async def times_out(**kwargs: Any) -> Any:
        raise TimeoutError("_ssl.c:989: The handshake operation timed out")

    with monkeypatch.context() as patch:
        patch.setattr(model._client.messages, "create", times_out)
        error, _ = await failure(model)
    assert (error.retryable, error.message) == (True, "anthropic: request timed out")

    def read_times_out(self: Any, event: Any) -> Any:
        raise TimeoutError("The read operation timed out")

    fake.script_turn(text="never read")
    monkeypatch.setattr(_Turn, "feed", read_times_out)
    error, _ = await failure(model)
    assert (error.retryable, error.message) == (True, "anthropic: request timed out")


async def test_a_tool_input_with_an_integer_too_long_to_read_is_a_bad_input(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    fake.script_blocks([ToolUse("query_database", '{"sql": "select 1", "n": ' + "9" * 5000 + "}", id="toolu_big")])

    end = (await collect(model))[-1]

    assert isinstance(end, TurnEnd)
    assert end.content[0]["input"] == {}
    assert end.bad_inputs["toolu_big"].startswith("tool input could not be read: Exceeds the limit (4300 digits)")


def nested(depth: int) -> str:
    return '{"sql": "select 1", "deep": ' + "[" * depth + "]" * depth + "}"


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (nested(5000), "is nested more than 100 levels deep"),  # past what json.loads itself can read
        (nested(101), "is nested more than 100 levels deep"),
        ('{"sql": "select 1", "n": 1e400}', "has a number JSON cannot carry"),
        ('{"sql": "select 1", "n": [-1e999]}', "has a number JSON cannot carry"),
        ('{"sql": "select 1", "n": NaN}', "has a number JSON cannot carry"),
        ('{"sql": "select \\ud800"}', "has text that is not valid Unicode"),
        ('{"sql": "select 1", "\\udfff": 1}', "has text that is not valid Unicode"),
    ],
)
async def test_a_tool_input_that_could_not_go_back_to_the_api_is_a_bad_input(
    fake: FakeAnthropic, model: AnthropicModel, raw: str, why: str
) -> None:
    """As it came, such an input would make the next request fail (the SDK cannot encode it) or the run crash
    (json.loads raising RecursionError): the call is refused and the history gets {} in its place."""
    fake.script_blocks([ToolUse("query_database", raw, id="toolu_odd")])

    end = (await collect(model))[-1]

    assert isinstance(end, TurnEnd)
    assert end.content[0]["input"] == {}
    assert end.bad_inputs["toolu_odd"].startswith(f"tool input {why}")
    assert end.bad_inputs["toolu_odd"].endswith("; it is replaced by {} in the conversation")


async def test_unusual_but_sendable_tool_inputs_are_kept(fake: FakeAnthropic, model: AnthropicModel) -> None:
    raw = '{"sql": "\\ud83d\\ude00", "": 1e308, "deep": ' + "[" * 99 + "]" * 99 + ', "big": ' + "9" * 400 + "}"
    fake.script_blocks([ToolUse("query_database", raw, id="toolu_ok")])

    end = (await collect(model))[-1]

    assert isinstance(end, TurnEnd) and end.bad_inputs == {}
    assert end.content[0]["input"]["sql"] == "\U0001f600"


async def test_lone_surrogates_in_the_turns_text_and_ids_do_not_reach_the_history(
    fake: FakeAnthropic, model: AnthropicModel
) -> None:
    """The history goes back to the API as UTF-8: a lone surrogate the model's JSON escapes produced would fail the
    next request, so it becomes U+FFFD there (the caller's events get the same from `service.rpc.convert`)."""
    fake.script_events(
        [
            ("content_block_start", {"type": "content_block_start", "index": 0, "content_block": {"type": "text"}}),
            (
                "content_block_delta",
                '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "half \\ud83d"}}',
            ),
            (
                "content_block_start",
                '{"type": "content_block_start", "index": 1, "content_block": '
                '{"type": "tool_use", "id": "toolu_1", "name": "query_database", "input": {}}}',
            ),
            (
                "message_delta",
                {"type": "message_delta", "delta": {"stop_reason": "tool_use"}, "usage": {"output_tokens": 3}},
            ),
            ("message_stop", {"type": "message_stop"}),
        ]
    )

    events = await collect(model)

    end = events[-1]
    assert isinstance(end, TurnEnd)
    assert end.content == [
        {"type": "text", "text": "half \ufffd"},
        {"type": "tool_use", "id": "toolu_1", "name": "query_database", "input": {}},
    ]
    assert ToolUseStart(call_id="toolu_1", name="query_database") in events
    json.dumps(end.content, ensure_ascii=False).encode()


START_TEXT = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}


@pytest.mark.parametrize(
    ("events", "words"),
    [
        ([("content_block_start", {"type": "content_block_start", "index": 0})], "AttributeError"),
        ([("content_block_start", {**START_TEXT, "index": "first"})], "a content block 'first' of type 'text'"),
        ([("content_block_start", {**START_TEXT, "content_block": {"type": 5}})], "a content block 0 of type 5"),
        (
            [("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": "many"}})],
            "token count",
        ),
        (
            [("message_delta", {"type": "message_delta", "delta": {"stop_reason": 7}, "usage": {"output_tokens": 1}})],
            "stop_reason that is not a string",
        ),
        (
            [
                ("content_block_start", START_TEXT),
                (
                    "content_block_delta",
                    '{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": 5}}',
                ),
            ],
            "TypeError",
        ),
        ([("content_block_start", "not json")], "JSONDecodeError"),
        ([("message_delta", '{"type": "message_delta", "x": ' + "[" * 5000 + "]" * 5000 + "}")], "RecursionError"),
        (
            [
                ("content_block_start", {"type": "content_block_start", "index": i, "content_block": block})
                for i, block in enumerate([{"type": "tool_use", "id": "toolu_1", "name": "q", "input": {}}] * 2)
            ],
            "two tool_use blocks with the id 'toolu_1'",
        ),
        (
            [("content_block_start", {**START_TEXT, "content_block": {"type": "tool_use", "id": 1, "name": "q"}})],
            "a tool_use block without a string id and name",
        ),
        # ids and names go back to the API, which takes neither of these (an outside finding: sent back verbatim)
        (
            [
                (
                    "content_block_start",
                    '{"type": "content_block_start", "index": 0, "content_block": '
                    '{"type": "tool_use", "id": "toolu_\\udc00", "name": "query_\\ud800", "input": {}}}',
                )
            ],
            "a tool_use block whose id or name the API would refuse",
        ),
        (
            [
                (
                    "content_block_start",
                    {**START_TEXT, "content_block": {"type": "tool_use", "id": "bad id/..", "name": "q"}},
                )
            ],
            "a tool_use block whose id or name the API would refuse",
        ),
        (
            [
                (
                    "content_block_start",
                    {**START_TEXT, "content_block": {"type": "tool_use", "id": "t1", "name": "q" * 129}},
                )
            ],
            "a tool_use block whose id or name the API would refuse",
        ),
        (
            [("message_delta", {"type": "message_delta", "delta": {}, "usage": {"output_tokens": 10**20}})],
            "token count that is not a whole number from 0 to 1000000000",
        ),
    ],
)
async def test_a_stream_that_breaks_the_protocol_is_a_malformed_stream(
    fake: FakeAnthropic, model: AnthropicModel, events: list[tuple[str, Any]], words: str
) -> None:
    """Whatever the upstream sends (a proxy's garbage, fields missing or of the wrong type), the turn ends with a
    model error saying the stream was malformed, never an exception of ours (INTERNAL)."""
    fake.script_events([*events, ("message_stop", {"type": "message_stop"})])

    error, _ = await failure(model)

    assert (error.kind, error.retryable) == ("malformed", True)
    assert error.message.startswith("anthropic: malformed stream: ")
    assert words in error.message


@pytest.mark.parametrize("ping_as", ["ping", "mystery_keepalive"])
async def test_a_stream_of_pings_alone_ends_after_the_silence_bound(fake: FakeAnthropic, ping_as: str) -> None:
    """The SDK's timeout is per read, and each ping is a read: without a bound of its own, an upstream that pings
    and never answers holds the turn for ever. An event of a type the protocol does not have is no content either."""
    fake.script_hang([Text("Let me")], ping_every=0.05, ping_as=ping_as)
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, timeout_s=5.0, idle_timeout_s=0.3)
    started = time.monotonic()
    try:
        async with asyncio.timeout(5):
            error, events = await failure(claude)
    finally:
        await claude.aclose()

    assert 0.3 <= time.monotonic() - started < 2
    assert (error.kind, error.retryable) == ("unavailable", True)
    assert error.message == "anthropic: the model sent no content for 0.3 s (model.idle_timeout_s)"
    assert "".join(e.text for e in events if isinstance(e, TextDelta)) == "Let me"
    await asyncio.wait_for(fake.disconnected.wait(), 1)  # the connection is dropped, not left pinging


async def test_a_turn_that_trickles_ends_after_the_total_bound(fake: FakeAnthropic) -> None:
    fake.script_blocks([Text(["tick "] * 200)], delay=0.02, pings=False)
    claude = AnthropicModel(
        api_key="test-key", base_url=fake.base_url, timeout_s=5.0, idle_timeout_s=1.0, turn_timeout_s=0.4
    )
    try:
        async with asyncio.timeout(5):
            error, events = await failure(claude)
    finally:
        await claude.aclose()

    assert (error.kind, error.retryable) == ("unavailable", True)
    assert error.message == "anthropic: the model turn took longer than 0.4 s (model.turn_timeout_s)"
    assert len(events) < 200  # cut short, not read to its end


async def test_a_consumer_slower_than_the_silence_bound_is_not_the_models_silence(fake: FakeAnthropic) -> None:
    """Only the wait for the upstream is bounded, never the consumer's own work between two events."""
    fake.script_turn(text=["a", "b"])
    claude = AnthropicModel(api_key="test-key", base_url=fake.base_url, idle_timeout_s=0.1)
    seen: list[ModelEvent] = []
    try:
        async for event in claude.stream_turn(request()):
            seen.append(event)
            await asyncio.sleep(0.15)
    finally:
        await claude.aclose()
    assert isinstance(seen[-1], TurnEnd)
