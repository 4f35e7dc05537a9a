"""Model retries are shown to the caller: a `model_retry` event before each wait, through the real SDK and the fake
Anthropic server, so that a caller whose model turn is being retried does not see a silent stream."""

from __future__ import annotations

import io
from typing import Any

from agent.v1 import agent_pb2 as pb
from conftest import run_events
from fake_anthropic import FakeAnthropic
from fake_tools import all_tools
from service import events as ev
from service.config import ModelRetry
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models.anthropic import AnthropicModel
from service.rpc.client import Renderer
from service.rpc.convert import to_proto
from service.rpc.server import Service


async def test_a_turn_retried_after_529_shows_the_retry_then_the_turn(
    fake: FakeAnthropic, claude_service: Service, channel_to: Any
) -> None:
    fake.script_http_error(529, headers={"retry-after-ms": "20"})
    fake.script_turn(text="Back.")
    events = await run_events(channel_to(claude_service))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[:3] == ["run_started", "model_retry", "text_delta"]
    assert kinds[-2:] == ["usage", "final_response"]
    retry = events[1].model_retry
    assert (retry.turn, retry.attempt, retry.max_attempts) == (1, 1, 3)
    assert retry.wait.ToNanoseconds() == 20_000_000  # the API's retry-after, which the loop waited
    assert "529" in retry.error and "overloaded" in retry.error.lower()
    assert [e.seq for e in events] == list(range(1, len(events) + 1))
    assert events[-1].final_response.text == "Back."


async def test_each_retry_of_a_later_turn_is_shown_with_the_wait_the_loop_took(fake: FakeAnthropic) -> None:
    """Overloaded mid-stream (before any content), then a 500, then the turn: two retries of turn 2, each with the
    backoff the loop then waited, and both after turn 1's tool result and before turn 2's text."""
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    fake.script_turn(tool_uses=[("echo", {"text": "a"})])
    fake.script_stream_error()
    fake.script_http_error(500)
    fake.script_turn(text="Done.")
    model = AnthropicModel(api_key="test-key", base_url=fake.base_url)
    retry = ModelRetry(attempts=3, initial_backoff_s=0.5, max_backoff_s=4)
    loop = AgentLoop(model, Executor(all_tools(), timeout_s=5), retry=retry, sleep=sleep)
    spec = RunSpec(
        run_id="run_r",
        message="go",
        model=model.default_model,
        system=None,
        max_turns=5,
        max_tokens=64,
        tools=("echo",),
    )
    try:
        events = [e async for e in loop.run(spec)]
    finally:
        await model.aclose()
    retries = [e for e in events if isinstance(e, ev.ModelRetry)]
    assert [(r.turn, r.attempt, r.max_attempts) for r in retries] == [(2, 1, 3), (2, 2, 3)]
    assert [r.wait_s for r in retries] == waits and len(waits) == 2
    assert "mid-stream" in retries[0].error and "HTTP 500" in retries[1].error
    first, second = (events.index(r) for r in retries)
    result = next(i for i, e in enumerate(events) if isinstance(e, ev.ToolResult))
    text = next(i for i, e in enumerate(events) if isinstance(e, ev.TextDelta))
    assert result < first < second < text
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "Done."


def test_model_retry_becomes_its_protobuf_field() -> None:
    event = ev.ModelRetry(turn=2, attempt=1, max_attempts=3, wait_s=1.25, error="anthropic: overloaded (HTTP 529)")
    wire = pb.AgentEvent.FromString(to_proto(event, "run_x", 7).SerializeToString())
    assert (wire.run_id, wire.seq, wire.WhichOneof("event")) == ("run_x", 7, "model_retry")
    retry = wire.model_retry
    assert (retry.turn, retry.attempt, retry.max_attempts) == (2, 1, 3)
    assert retry.wait.ToNanoseconds() == 1_250_000_000
    assert retry.error == "anthropic: overloaded (HTTP 529)"


def test_the_client_shows_a_model_retry_on_a_line_of_its_own() -> None:
    out = io.StringIO()
    renderer = Renderer(out, color=False)
    renderer.event(pb.AgentEvent(text_delta=pb.TextDelta(turn=1, text="Hm")))
    event = ev.ModelRetry(turn=1, attempt=2, max_attempts=3, wait_s=0.5, error="overloaded")
    renderer.event(to_proto(event, "run_x", 2))
    assert out.getvalue() == "Hm\n↻ model turn 1 retry 2/3 in 500 ms: overloaded\n"
