"""The whole claude_service with the real Claude adapter: gRPC in, real SDK out to a local server that speaks the
Messages streaming protocol."""

from __future__ import annotations

import asyncio
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
from service.rpc.server import Service


async def loop_run(
    fake: FakeAnthropic, *, attempts: int = 3, control: RunControl | None = None, **model_options: Any
) -> tuple[list[ev.Event], list[float]]:
    """One run through the loop and the real adapter, without gRPC: the loop's waits recorded, not slept."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    model = AnthropicModel(api_key="test-key", base_url=fake.base_url, **model_options)
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
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_turn(
        text="Checking both.",
        thinking="Two lookups.",
        tool_uses=[("echo", {"text": "a"}), ("count", {"n": 2})],
    )
    fake.script_turn(text="All done.")
    events = await run_events(channel_to(claude_service), message="go", tools=["echo", "count"])
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
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_http_error(529)
    fake.script_turn(text="Back.")
    events = await run_events(channel_to(claude_service))
    assert events[-1].final_response.text == "Back."
    assert len(fake.requests) == 2  # one failed request, one retry by the loop: the SDK itself did not retry


async def test_overloaded_mid_stream_after_text_ends_the_run_retryable(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_stream_error([Text("partial answer")])
    seen: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stub(channel_to(claude_service)).RunAgent(pb.RunAgentRequest(message="go")):
            seen.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "".join(e.text_delta.text for e in seen if e.HasField("text_delta")) == "partial answer"
    assert seen[-1].error.retryable and "after part of it was streamed" in seen[-1].error.message
    assert len(fake.requests) == 1


async def test_rejected_api_key_is_failed_precondition(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_http_error(401)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(claude_service))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "authentication failed (HTTP 401)" in (info.value.details() or "")


async def test_a_tool_input_that_is_not_json_is_named_once_in_the_result_the_model_reads(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_blocks([ToolUse("echo", '{"text": "a', id="toolu_bad"), ToolUse("echo", "[1]", id="toolu_list")])
    fake.script_turn(text="Sorry.")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    assert events[-1].final_response.text == "Sorry."
    results = fake.requests[1].body["messages"][2]["content"]
    assert [(r["tool_use_id"], r["is_error"]) for r in results] == [("toolu_bad", True), ("toolu_list", True)]
    assert results[0]["content"].startswith("rejected: tool input is not valid JSON: Unterminated string")
    assert results[0]["content"].count("not valid JSON") == 1
    assert results[1]["content"] == "rejected: tool input is a JSON list, not an object"


async def test_a_tool_call_cut_off_by_max_tokens_does_not_run_and_the_model_is_told_why(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_blocks(
        [ToolUse("echo", {"text": "whole"}, id="toolu_whole"), ToolUse("echo", '{"text": "cu', id="toolu_cut")],
        stop_reason="max_tokens",
    )
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    assert events[-1].final_response.text == "Done."
    ran = [e.tool_call_ready.call_id for e in events if e.HasField("tool_call_ready")]
    assert ran == ["toolu_whole"]
    results = fake.requests[1].body["messages"][2]["content"]
    assert [r["tool_use_id"] for r in results] == ["toolu_whole", "toolu_cut"]
    assert results[1]["is_error"] is True
    assert results[1]["content"].startswith("rejected: the turn ended (max_tokens) before this tool call's input")


async def test_a_refused_turn_runs_none_of_its_tool_calls_and_ends_the_run(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    """stop_reason refusal: the API stopped the turn for safety, so the calls in it are not the model's to make."""
    fake.script_blocks([Text("Sure, "), ToolUse("echo", {"text": "x"}, id="toolu_refused")], stop_reason="refusal")
    fake.script_turn(text="never asked for")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    assert not any(e.HasField("tool_call_ready") for e in events)
    (result,) = [e.tool_result for e in events if e.HasField("tool_result")]  # the caller saw the call begin
    assert (result.call_id, result.status) == ("toolu_refused", pb.TOOL_STATUS_REJECTED)
    assert result.error == "not run: the model's turn was stopped (refusal)"
    final = events[-1].final_response
    assert (final.stop_reason, final.text, final.tool_calls) == ("refusal", "Sure, ", 0)
    assert len(fake.requests) == 1


async def test_a_paused_turn_is_continued_as_the_same_assistant_message(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    """stop_reason pause_turn: the API paused a long turn; sending it back as it stands lets the model go on."""
    fake.script_blocks([Text("Searching")], stop_reason="pause_turn")
    fake.script_blocks([Text(" still"), ToolUse("echo", {"text": "x"}, id="toolu_1")])
    fake.script_turn(text=" Done.")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    final = events[-1].final_response
    assert (final.text, final.stop_reason, final.turns, final.tool_calls) == (" Done.", "end_turn", 3, 1)
    paused = {"role": "assistant", "content": [{"type": "text", "text": "Searching"}]}
    assert fake.requests[1].body["messages"][1:] == [paused]
    user, assistant, results = fake.requests[2].body["messages"]
    assert [b.get("text") or b["id"] for b in assistant["content"]] == ["Searching", " still", "toolu_1"]
    assert [b["tool_use_id"] for b in results["content"]] == ["toolu_1"]


async def test_the_answer_of_a_paused_turn_is_all_of_its_text(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_blocks([Text("The answer")], stop_reason="pause_turn")
    fake.script_turn(text=" is 42.")
    events = await run_events(channel_to(claude_service))
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
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
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
    events = await run_events(channel_to(claude_service), tools=["echo"])
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


async def test_tool_inputs_the_api_could_not_take_back_are_refused_and_the_run_goes_on(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    """Each of these inputs used to end the run: nested past json.loads with INTERNAL, the others by failing the
    next request, reported as the model refusing it."""
    deep = '{"text": ' + "[" * 5000 + "]" * 5000 + "}"
    fake.script_blocks(
        [
            ToolUse("echo", deep, id="toolu_deep"),
            ToolUse("echo", '{"text": "a", "times": 1e400}', id="toolu_inf"),
            ToolUse("echo", '{"text": "\\ud800"}', id="toolu_half"),
            ToolUse("echo", '{"text": "fine"}', id="toolu_fine"),
        ]
    )
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    assert events[-1].final_response.text == "Done."
    results = {e.tool_result.call_id: e.tool_result for e in events if e.HasField("tool_result")}
    assert [results[c].status for c in ("toolu_deep", "toolu_inf", "toolu_half")] == [pb.TOOL_STATUS_REJECTED] * 3
    assert results["toolu_fine"].status == pb.TOOL_STATUS_OK
    assistant, answers = fake.requests[1].body["messages"][1:]
    assert [b["input"] for b in assistant["content"]] == [{}, {}, {}, {"text": "fine"}]
    said = {a["tool_use_id"]: a["content"] for a in answers["content"]}
    assert said["toolu_deep"] == (
        "rejected: tool input is nested more than 100 levels deep; it is replaced by {} in the conversation"
    )
    assert said["toolu_inf"].startswith("rejected: tool input has a number JSON cannot carry")
    assert said["toolu_half"].startswith("rejected: tool input has text that is not valid Unicode")
    assert said["toolu_inf"].endswith("it is replaced by {} in the conversation")


async def test_a_tool_call_begun_in_a_turn_that_failed_still_gets_a_result(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    """The caller saw the call begin (tool_call) before the model failed mid-turn: it learns the call never ran."""
    fake.script_stream_error([ToolUse("echo", {"text": "a"}, id="toolu_begun")])
    seen: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in stub(channel_to(claude_service)).RunAgent(pb.RunAgentRequest(message="go", tools=["echo"])):
            seen.append(event)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    kinds = [e.WhichOneof("event") for e in seen]
    assert kinds.index("tool_call") < kinds.index("tool_result") < kinds.index("error") == len(kinds) - 1
    (result,) = [e.tool_result for e in seen if e.HasField("tool_result")]
    assert (result.call_id, result.status) == ("toolu_begun", pb.TOOL_STATUS_REJECTED)
    assert result.error.startswith("not run: model turn 1 failed after part of it was streamed: ")


async def run_failure(fake: FakeAnthropic, **kwargs: Any) -> tuple[ev.RunFailed, list[float]]:
    events, waits = await loop_run(fake, **kwargs)
    assert isinstance(events[-1], ev.RunFailed), events[-1]
    return events[-1], waits


@pytest.mark.parametrize(
    ("status", "message"),
    [
        (529, "the model is unavailable (turn 1, not retried as the API asks): anthropic: overloaded (HTTP 529)"),
        (500, "the model is unavailable (turn 1, not retried as the API asks): anthropic: server error (HTTP 500)"),
    ],
)
async def test_a_model_down_that_the_api_says_not_to_retry_is_unavailable(
    fake: FakeAnthropic, status: int, message: str
) -> None:
    fake.script_http_error(status, headers={"x-should-retry": "false"})
    failed, waits = await run_failure(fake)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert failed.message.startswith(message)
    assert (waits, len(fake.requests)) == ([], 1)


async def test_a_model_server_error_is_retried_then_unavailable(fake: FakeAnthropic) -> None:
    for _ in range(3):
        fake.script_http_error(500)
    failed, waits = await run_failure(fake)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert failed.message.startswith("model turn 1 failed after 3 attempt(s): anthropic: server error (HTTP 500)")
    assert len(waits) == 2


@pytest.mark.parametrize("status", [401, 403])
async def test_the_servers_model_credentials_refused_is_failed_precondition_and_says_whose(
    fake: FakeAnthropic, status: int
) -> None:
    """Not UNAUTHENTICATED / PERMISSION_DENIED: those tell a caller that its own credentials are wrong."""
    fake.script_http_error(status)
    failed, waits = await run_failure(fake)
    assert (failed.code, failed.retryable) == ("FAILED_PRECONDITION", False)
    assert failed.message.startswith(
        "the model API refused the server's credentials or account, a problem of the server's set-up, not of the "
        "request: anthropic: "
    )
    assert f"(HTTP {status})" in failed.message
    assert (waits, len(fake.requests)) == ([], 1)


async def test_a_request_the_model_api_rejects_is_invalid_argument(fake: FakeAnthropic) -> None:
    fake.script_http_error(400, message="prompt is too long: 210000 tokens > 200000 maximum")
    failed, _ = await run_failure(fake)
    assert (failed.code, failed.retryable) == ("INVALID_ARGUMENT", False)
    assert failed.message == (
        "the model API rejected the request: anthropic: invalid request (HTTP 400): prompt is too long: 210000 "
        "tokens > 200000 maximum [request-id req_fake]"
    )


async def test_a_malformed_stream_is_retried_then_unavailable_and_says_so(fake: FakeAnthropic) -> None:
    fake.script_events([("content_block_start", "<html>502 Bad Gateway</html>")])
    fake.script_events([("content_block_start", {"type": "content_block_start", "index": 0})])
    failed, waits = await run_failure(fake, attempts=2)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert failed.message.startswith("model turn 1 failed after 2 attempt(s): anthropic: malformed stream: ")
    assert (len(waits), len(fake.requests)) == (1, 2)


async def test_a_malformed_stream_once_is_made_good_by_a_retry(fake: FakeAnthropic) -> None:
    fake.script_events([("content_block_start", "not json")])
    fake.script_turn(text="Back.")
    events, _ = await loop_run(fake)
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "Back."


async def test_a_model_that_only_pings_is_retried_then_unavailable(fake: FakeAnthropic) -> None:
    fake.script_hang(ping_every=0.05)
    fake.script_hang(ping_every=0.05)
    failed, waits = await run_failure(fake, attempts=2, idle_timeout_s=0.2)
    assert (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert failed.message == (
        "model turn 1 failed after 2 attempt(s): anthropic: the model sent no content for 0.2 s (model.idle_timeout_s)"
    )
    assert (len(waits), len(fake.requests)) == (1, 2)


async def test_a_model_that_pings_after_some_text_ends_the_run_unavailable(fake: FakeAnthropic) -> None:
    """Text reached the caller: another try would show it a different answer, so the run ends, retryable."""
    fake.script_hang([Text("Half an ans")], ping_every=0.05)
    events, waits = await loop_run(fake, idle_timeout_s=0.2)
    failed = events[-1]
    assert isinstance(failed, ev.RunFailed) and (failed.code, failed.retryable) == ("UNAVAILABLE", True)
    assert "failed after part of it was streamed: anthropic: the model sent no content for 0.2 s" in failed.message
    assert waits == []


async def test_the_model_bounds_come_from_the_config(tmp_path: Path) -> None:
    from service.wiring import build_model

    config = make_config(tmp_path, model={"provider": "anthropic", "idle_timeout_s": 7, "turn_timeout_s": 70})
    model = build_model(config)
    assert isinstance(model, AnthropicModel)
    assert (model._idle_timeout_s, model._turn_timeout_s) == (7, 70)
    await model.aclose()


async def test_a_paused_turn_that_asks_for_tools_runs_them(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    """Sent back as it stands, the paused turn's tool_use would have no result (the API refuses such a history) and
    the caller would never see the call end: it is a tool turn like any other."""
    fake.script_blocks([Text("Let me"), ToolUse("echo", {"text": "a"}, id="toolu_p")], stop_reason="pause_turn")
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(claude_service), tools=["echo"])
    assert events[-1].final_response.text == "Done."
    (result,) = [e.tool_result for e in events if e.HasField("tool_result")]
    assert (result.call_id, result.status) == ("toolu_p", pb.TOOL_STATUS_OK)
    user, assistant, results = fake.requests[1].body["messages"]
    assert [b["type"] for b in assistant["content"]] == ["text", "tool_use"]
    assert [(b["type"], b["tool_use_id"]) for b in results["content"]] == [("tool_result", "toolu_p")]
