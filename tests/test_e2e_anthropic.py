"""The whole service with the real Claude adapter: gRPC in, real SDK out to a local server that speaks the
Messages streaming protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import make_config, run_events, stub
from fake_anthropic import FakeAnthropic, RedactedThinking, Text, Thinking, ToolUse
from fake_tools import all_tools
from service import events as ev
from service.config import ModelRetry
from service.control import RunControl
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models.anthropic import AnthropicModel
from service.server import Service, start


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def service(fake: FakeAnthropic, tmp_path: Path) -> AsyncIterator[Service]:
    model = AnthropicModel(api_key="test-key", base_url=fake.base_url, default_model="claude-sonnet-4-6")
    config = make_config(tmp_path, model={"retry": {"attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}})
    svc = await start(config, metrics=False, tools=all_tools(), model=model)
    yield svc
    await svc.server.stop(0)
    await svc.close()


async def loop_run(
    fake: FakeAnthropic, *, attempts: int = 3, control: RunControl | None = None
) -> tuple[list[ev.Event], list[float]]:
    """One run through the loop and the real adapter, without gRPC: the loop's waits recorded, not slept."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    model = AnthropicModel(api_key="test-key", base_url=fake.base_url)
    retry = ModelRetry(attempts=attempts, initial_backoff_s=0.5, max_backoff_s=4)
    loop = AgentLoop(model, Executor(all_tools(), timeout_s=5), retry=retry, sleep=sleep)
    spec = RunSpec(
        run_id="run_e2e", message="go", model=model.default_model, system=None, max_turns=5, max_tokens=1024, tools=()
    )
    try:
        return [e async for e in loop.run(spec, control)], waits
    finally:
        await model.aclose()


async def test_claude_run_with_parallel_tools_end_to_end(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_turn(
        text="Checking both.",
        thinking="Two lookups.",
        tool_uses=[("echo", {"text": "a"}), ("count", {"n": 2})],
    )
    fake.script_turn(text="All done.")
    events = await run_events(channel_to(service), message="go", tools=["echo", "count"])
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "run_started" and kinds[-1] == "final_response"
    assert "".join(e.thinking.text for e in events if e.HasField("thinking")) == "Two lookups."
    assert "".join(e.text_delta.text for e in events if e.HasField("text_delta")) == "Checking both.All done."
    assert len([k for k in kinds if k == "tool_result_chunk"]) == 2
    assert events[-1].final_response.text == "All done."
    first, second = fake.requests
    assert first.body["model"] == "claude-sonnet-4-6"
    assert [t["name"] for t in first.body["tools"]] == ["echo", "count"]
    assert first.body["messages"] == [{"role": "user", "content": [{"type": "text", "text": "go"}]}]
    # the second request carries the assistant turn (with the thinking signature) and the results in order
    assistant, results = second.body["messages"][1:]
    assert assistant["content"][0]["type"] == "thinking" and assistant["content"][0]["signature"]
    tool_ids = [b["id"] for b in assistant["content"] if b["type"] == "tool_use"]
    assert [b["tool_use_id"] for b in results["content"]] == tool_ids
    assert results["content"][0]["content"] == '{"echo": "a"}'
    assert results["content"][1]["content"] == '[{"i": 0}, {"i": 1}]'


async def test_overloaded_before_the_stream_is_retried_by_the_service(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_http_error(529)
    fake.script_turn(text="Back.")
    events = await run_events(channel_to(service))
    assert events[-1].final_response.text == "Back."
    assert len(fake.requests) == 2  # one failed request, one retry by the loop: the SDK itself did not retry


async def test_overloaded_mid_stream_after_text_ends_the_run_retryable(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_stream_error([Text("partial answer")])
    seen: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stub(channel_to(service)).RunAgent(pb.RunAgentRequest(message="go")):
            seen.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "".join(e.text_delta.text for e in seen if e.HasField("text_delta")) == "partial answer"
    assert seen[-1].error.retryable and "after part of it was streamed" in seen[-1].error.message
    assert len(fake.requests) == 1


async def test_rejected_api_key_is_failed_precondition(fake: FakeAnthropic, service: Service, channel_to: Any) -> None:
    fake.script_http_error(401)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(service))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "authentication failed (HTTP 401)" in (info.value.details() or "")


async def test_a_tool_input_that_is_not_json_is_named_once_in_the_result_the_model_reads(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_blocks([ToolUse("echo", '{"text": "a', id="toolu_bad"), ToolUse("echo", "[1]", id="toolu_list")])
    fake.script_turn(text="Sorry.")
    events = await run_events(channel_to(service), tools=["echo"])
    assert events[-1].final_response.text == "Sorry."
    results = fake.requests[1].body["messages"][2]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("toolu_bad", True), ("toolu_list", True)]
    assert results[0]["content"].startswith("rejected: tool input is not valid JSON: Unterminated string")
    assert results[0]["content"].count("not valid JSON") == 1
    assert results[1]["content"] == "rejected: tool input is a JSON list, not an object"


async def test_a_tool_call_cut_off_by_max_tokens_does_not_run_and_the_model_is_told_why(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_blocks(
        [ToolUse("echo", {"text": "whole"}, id="toolu_whole"), ToolUse("echo", '{"text": "cu', id="toolu_cut")],
        stop_reason="max_tokens",
    )
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(service), tools=["echo"])
    assert events[-1].final_response.text == "Done."
    ran = [e.tool_call_ready.call_id for e in events if e.HasField("tool_call_ready")]
    assert ran == ["toolu_whole"]
    results = fake.requests[1].body["messages"][2]["content"]
    assert [r["tool_use_id"] for r in results] == ["toolu_whole", "toolu_cut"]
    assert results[1]["is_error"] is True
    assert results[1]["content"].startswith("rejected: the turn ended (max_tokens) before this tool call's input")


async def test_a_refused_turn_runs_none_of_its_tool_calls_and_ends_the_run(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    """stop_reason refusal: the API stopped the turn for safety, so the calls in it are not the model's to make."""
    fake.script_blocks([Text("Sure, "), ToolUse("echo", {"text": "x"}, id="toolu_refused")], stop_reason="refusal")
    fake.script_turn(text="never asked for")
    events = await run_events(channel_to(service), tools=["echo"])
    assert not any(e.HasField("tool_call_ready") for e in events)
    (result,) = [e.tool_result for e in events if e.HasField("tool_result")]  # the caller saw the call begin
    assert (result.call_id, result.status) == ("toolu_refused", pb.TOOL_STATUS_REJECTED)
    assert result.error == "not run: the model's turn was stopped (refusal)"
    final = events[-1].final_response
    assert (final.stop_reason, final.text, final.tool_calls) == ("refusal", "Sure, ", 0)
    assert len(fake.requests) == 1


async def test_a_paused_turn_is_continued_as_the_same_assistant_message(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    """stop_reason pause_turn: the API paused a long turn; sending it back as it stands lets the model go on."""
    fake.script_blocks([Text("Searching")], stop_reason="pause_turn")
    fake.script_blocks([Text(" still"), ToolUse("echo", {"text": "x"}, id="toolu_1")])
    fake.script_turn(text=" Done.")
    events = await run_events(channel_to(service), tools=["echo"])
    final = events[-1].final_response
    assert (final.text, final.stop_reason, final.turns, final.tool_calls) == (" Done.", "end_turn", 3, 1)
    paused = {"role": "assistant", "content": [{"type": "text", "text": "Searching"}]}
    assert fake.requests[1].body["messages"][1:] == [paused]
    user, assistant, results = fake.requests[2].body["messages"]
    assert [b.get("text") or b["id"] for b in assistant["content"]] == ["Searching", " still", "toolu_1"]
    assert [b["tool_use_id"] for b in results["content"]] == ["toolu_1"]


async def test_the_answer_of_a_paused_turn_is_all_of_its_text(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    fake.script_blocks([Text("The answer")], stop_reason="pause_turn")
    fake.script_turn(text=" is 42.")
    events = await run_events(channel_to(service))
    final = events[-1].final_response
    assert (final.text, final.stop_reason, final.turns) == ("The answer is 42.", "end_turn", 2)


async def test_the_loop_waits_as_long_as_retry_after_asks(fake: FakeAnthropic) -> None:
    fake.script_http_error(429, headers={"retry-after": "7"})
    fake.script_http_error(529, headers={"retry-after-ms": "20"})
    fake.script_turn(text="Back.")
    events, waits = await loop_run(fake)
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "Back."
    assert waits == [7.0, 0.02]  # not the backoff's 0.5 s and 1 s


async def test_a_retry_after_beyond_what_a_run_waits_ends_the_run_at_once(fake: FakeAnthropic) -> None:
    fake.script_http_error(429, headers={"retry-after": "3600"})
    events, waits = await loop_run(fake)
    failed = events[-1]
    assert isinstance(failed, ev.RunFailed)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert "asks to retry after 3600 s" in failed.message
    assert (waits, len(fake.requests)) == ([], 1)


async def test_a_retry_after_past_the_runs_deadline_ends_the_run_at_once_retryable(fake: FakeAnthropic) -> None:
    """Waiting would only end the run DEADLINE_EXCEEDED when the deadline comes; the caller learns now that the
    model is what is unavailable, and that another try later may work."""
    fake.script_http_error(429, headers={"retry-after": "30"})
    control = RunControl(deadline=asyncio.get_running_loop().time() + 10)
    events, waits = await loop_run(fake, control=control)
    failed = events[-1]
    assert isinstance(failed, ev.RunFailed)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert "asks to retry after 30 s, after the run's deadline" in failed.message
    assert (waits, len(fake.requests)) == ([], 1)


async def test_thinking_blocks_go_back_to_the_model_as_they_came(
    fake: FakeAnthropic, service: Service, channel_to: Any
) -> None:
    """With thinking and tool use, the API checks that the assistant turn it is sent back has its thinking blocks,
    signatures and redacted ones unchanged and in their places."""
    fake.script_blocks(
        [
            Thinking("Look it up.", signature="sig-1"),
            RedactedThinking("opaque-1"),
            Text("Checking."),
            ToolUse("echo", {"text": "a"}, id="toolu_1"),
        ]
    )
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(service), tools=["echo"])
    assert "".join(e.thinking.text for e in events if e.HasField("thinking")) == "Look it up."
    assert fake.requests[1].body["messages"][1] == {
        "role": "assistant",
        "content": [
            {"type": "thinking", "thinking": "Look it up.", "signature": "sig-1"},
            {"type": "redacted_thinking", "data": "opaque-1"},
            {"type": "text", "text": "Checking."},
            {"type": "tool_use", "id": "toolu_1", "name": "echo", "input": {"text": "a"}},
        ],
    }
