"""The agent loop with the scripted model and test tools: no network, no gRPC."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator
from typing import Any

import pytest

from fake_tools import EchoInput, all_tools
from service import events as ev
from service.config import ModelRetry, Pacing
from service.executor import Executor
from service.loop import AgentLoop, RunSpec
from service.models import base as m
from service.models.scripted import Scenario, ScriptedModel, json_length
from service.turns import tool_result_block
from tools.base import JSON, Tool


def scenario(*turns: dict[str, Any]) -> Scenario:
    return Scenario.model_validate({"name": "test", "turns": list(turns)})


def make_loop(model: Any, *, timeout_s: float = 5.0, attempts: int = 3) -> tuple[AgentLoop, list[float]]:
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    retry = ModelRetry(attempts=attempts, initial_backoff_s=0.5, max_backoff_s=4)
    loop = AgentLoop(model, Executor(all_tools(), timeout_s=timeout_s), retry=retry, sleep=sleep)
    return loop, waits


def spec(**overrides: Any) -> RunSpec:
    values: dict[str, Any] = dict(
        run_id="run_test",
        message="hello",
        model="m",
        system=None,
        max_turns=5,
        max_tokens=100,
        tools=tuple(all_tools()),
    )
    values.update(overrides)
    return RunSpec(**values)


async def collect(loop: AgentLoop, run: RunSpec | None = None) -> list[ev.Event]:
    return [e async for e in loop.run(run or spec())]


def scripted(*turns: dict[str, Any]) -> ScriptedModel:
    return ScriptedModel(scenario(*turns), pacing=Pacing(first_token_ms=0, token_interval_ms=0))


def of(events: list[ev.Event], kind: type[Any]) -> list[Any]:
    return [e for e in events if isinstance(e, kind)]


async def test_full_run_streams_every_step_in_order() -> None:
    model = scripted(
        {"thinking": "I think.", "text": "Let me echo.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]},
        {"text": "Done: {results}"},
    )
    loop, _ = make_loop(model)
    events = await collect(loop)
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "RunStarted"
    assert kinds[-1] == "FinalResponse"
    assert kinds.index("Thinking") < kinds.index("TextDelta") < kinds.index("ToolCall")
    assert kinds.index("ToolCall") < kinds.index("ToolCallDelta") < kinds.index("ToolCallReady")
    assert kinds.index("ToolCallReady") < kinds.index("ToolResult") < kinds.index("FinalResponse")
    assert "".join(e.text for e in of(events, ev.Thinking)) == "I think."
    call = of(events, ev.ToolCall)[0]
    partial = "".join(e.partial_json for e in of(events, ev.ToolCallDelta) if e.call_id == call.call_id)
    assert json.loads(partial) == {"text": "hi"}
    assert of(events, ev.ToolCallReady)[0].input == {"text": "hi"}
    result = of(events, ev.ToolResult)[0]
    assert (result.status, result.data) == (ev.ToolStatus.OK, {"echo": "hi"})
    usage = of(events, ev.Usage)
    assert [u.turn for u in usage] == [1, 2]
    assert usage[-1].total_output_tokens == sum(u.output_tokens for u in usage) > 0
    final = events[-1]
    assert isinstance(final, ev.FinalResponse)
    assert final.text.startswith("Done: \n- echo answered: ")
    assert (final.turns, final.tool_calls, final.stop_reason) == (2, 1, "end_turn")


async def test_tool_calls_of_one_turn_run_concurrently() -> None:
    # `meet` returns only when both calls are in progress at once: run one after the other, they would time out.
    calls = [{"name": "meet", "input": {"who": "a"}}, {"name": "meet", "input": {"who": "b"}}]
    loop, _ = make_loop(scripted({"tool_calls": calls}, {"text": "ok"}), timeout_s=2)
    events = await collect(loop)
    assert [r.status for r in of(events, ev.ToolResult)] == [ev.ToolStatus.OK, ev.ToolStatus.OK]


async def test_results_go_back_in_the_order_the_model_asked() -> None:
    calls = [{"name": "sleep", "input": {"seconds": 0.05}}, {"name": "echo", "input": {"text": "fast"}}]
    model = scripted({"tool_calls": calls}, {"text": "ok"})
    loop, _ = make_loop(model)
    events = await collect(loop)
    finished = [r.name for r in of(events, ev.ToolResult)]
    assert finished == ["echo", "sleep"]  # echo finished first...
    asked = [c.call_id for c in of(events, ev.ToolCall)]
    sent_back = model.requests[1].messages[-1]["content"]
    assert [b["tool_use_id"] for b in sent_back] == asked  # ...but the model gets them in its own order


async def test_tool_failures_become_results_the_model_reads() -> None:
    calls = [
        {"name": "fail", "input": {"text": "x"}},
        {"name": "buggy", "input": {"text": "x"}},
        {"name": "echo", "input": {"text": "x", "times": 99}},
        {"name": "nonexistent", "input": {}},
    ]
    model = scripted({"tool_calls": calls}, {"text": "recovered"})
    loop, _ = make_loop(model)
    events = await collect(loop, spec(tools=("fail", "buggy", "echo")))
    results = {r.name: r for r in of(events, ev.ToolResult)}
    assert results["fail"].status is ev.ToolStatus.ERROR and results["fail"].error == "cannot do x"
    assert results["buggy"].status is ev.ToolStatus.ERROR and "ZeroDivisionError" in results["buggy"].error
    assert results["echo"].status is ev.ToolStatus.REJECTED
    assert "times: Input should be less than or equal to 3" in results["echo"].error
    # the scripted model only calls offered tools, so `nonexistent` was never asked for
    assert "nonexistent" not in results
    assert [r.name for r in of(events, ev.ToolCallReady)] == ["fail", "buggy"]  # rejected input never runs
    sent_back = model.requests[1].messages[-1]["content"]
    assert all(b["is_error"] for b in sent_back)
    assert isinstance(events[-1], ev.FinalResponse)


class OneShotModel:
    """A model whose first turn is given verbatim (to send what the scripted model never would)."""

    def __init__(self, first: m.TurnEnd) -> None:
        self.first = first
        self.turns = 0

    @property
    def default_model(self) -> str:
        return "one-shot"

    async def aclose(self) -> None:
        pass

    async def stream_turn(self, request: m.TurnRequest) -> AsyncGenerator[m.ModelEvent, None]:
        self.turns += 1
        if self.turns == 1:
            yield self.first
        else:
            yield m.TurnEnd(
                stop_reason="end_turn", content=[{"type": "text", "text": "ok"}], input_tokens=1, output_tokens=1
            )


async def test_unknown_tool_and_bad_json_from_the_model_are_rejected() -> None:
    first = m.TurnEnd(
        stop_reason="tool_use",
        content=[
            {"type": "tool_use", "id": "a", "name": "rm_rf", "input": {}},
            {"type": "tool_use", "id": "b", "name": "echo", "input": {}},
        ],
        input_tokens=1,
        output_tokens=1,
        bad_inputs={"b": "tool input is not valid JSON: Expecting value: line 1 column 9"},
    )
    loop, _ = make_loop(OneShotModel(first))
    events = await collect(loop, spec(tools=("echo",)))
    a, b = of(events, ev.ToolResult)
    assert (a.status, b.status) == (ev.ToolStatus.REJECTED, ev.ToolStatus.REJECTED)
    assert a.error == "unknown tool 'rm_rf'; available tools: echo"
    assert b.error == "tool input is not valid JSON: Expecting value: line 1 column 9"
    assert isinstance(events[-1], ev.FinalResponse)


async def test_streaming_tool_emits_chunks() -> None:
    loop, _ = make_loop(scripted({"tool_calls": [{"name": "count", "input": {"n": 3}}]}, {"text": "ok"}))
    events = await collect(loop)
    chunks = of(events, ev.ToolResultChunk)
    assert [(c.index, c.total, c.data) for c in chunks] == [(0, 3, {"i": 0}), (1, 3, {"i": 1}), (2, 3, {"i": 2})]
    assert of(events, ev.ToolResult)[0].data == [{"i": 0}, {"i": 1}, {"i": 2}]


async def test_tool_timeout_is_a_result() -> None:
    loop, _ = make_loop(
        scripted({"tool_calls": [{"name": "sleep", "input": {"seconds": 10}}]}, {"text": "ok"}), timeout_s=0.05
    )
    events = await collect(loop)
    result = of(events, ev.ToolResult)[0]
    assert result.status is ev.ToolStatus.TIMEOUT
    assert result.error == "sleep did not finish within 0.05 s"


async def test_max_turns_ends_the_run_with_an_error() -> None:
    call = {"tool_calls": [{"name": "echo", "input": {"text": "again"}}]}
    loop, _ = make_loop(scripted(call, call, call, call))
    events = await collect(loop, spec(max_turns=2))
    last = events[-1]
    assert isinstance(last, ev.RunFailed)
    assert last.code == "RESOURCE_EXHAUSTED" and "max_turns=2" in last.message
    assert len(of(events, ev.Usage)) == 2


async def test_retryable_model_failure_is_retried_with_backoff() -> None:
    model = scripted({"text": "fine", "fail": {"status": 529, "times": 2}})
    loop, waits = make_loop(model)
    events = await collect(loop)
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "fine"
    assert len(model.requests) == 3
    assert len(waits) == 2 and 0 < waits[0] <= 4 and 0 < waits[1] <= 4


async def test_a_model_retry_that_would_come_after_the_deadline_ends_the_run_at_once_retryable() -> None:
    from service.control import RunControl

    loop, waits = make_loop(scripted({"text": "fine", "fail": {"status": 529, "times": 2}}))
    control = RunControl(deadline=asyncio.get_running_loop().time() + 0.3)  # the first backoff is 0.5 s or more
    events = [e async for e in loop.run(spec(), control)]
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and (last.code, last.retryable) == ("UNAVAILABLE", True)
    assert "the next try would come after" in last.message and "after the run's deadline" in last.message
    assert waits == []


async def test_model_down_after_all_attempts_is_unavailable() -> None:
    loop, waits = make_loop(scripted({"text": "fine", "fail": {"status": 503, "times": 5}}), attempts=3)
    events = await collect(loop)
    last = events[-1]
    assert isinstance(last, ev.RunFailed)
    assert (last.code, last.retryable) == ("UNAVAILABLE", True)
    assert "after 3 attempt(s)" in last.message
    assert len(waits) == 2


async def test_no_retry_once_deltas_reached_the_caller() -> None:
    model = scripted({"text": "one two three four", "fail": {"status": 529, "after_tokens": 2}})
    loop, waits = make_loop(model)
    events = await collect(loop)
    assert "".join(e.text for e in of(events, ev.TextDelta)) == "one two "
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and last.code == "UNAVAILABLE" and last.retryable
    assert "after part of it was streamed" in last.message
    assert waits == [] and len(model.requests) == 1


async def test_request_refused_by_the_model_is_not_retried() -> None:
    loop, waits = make_loop(scripted({"text": "x", "fail": {"status": 400, "message": "prompt too long"}}))
    events = await collect(loop)
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and (last.code, last.retryable) == ("INVALID_ARGUMENT", False)
    assert waits == []


CREDENTIALS = "the model API refused the server's credentials or account, a problem of the server's set-up, not of "


@pytest.mark.parametrize(
    ("status", "code", "message"),
    [
        (401, "FAILED_PRECONDITION", CREDENTIALS + "the request: no"),
        (403, "FAILED_PRECONDITION", CREDENTIALS + "the request: no"),
        (404, "INVALID_ARGUMENT", "the model API rejected the request: no"),
        (422, "FAILED_PRECONDITION", "the model request failed: no"),
    ],
)
async def test_a_model_failure_of_an_adapter_that_gives_only_the_http_status_says_what_failed(
    status: int, code: str, message: str
) -> None:
    loop, waits = make_loop(scripted({"text": "x", "fail": {"status": status, "message": "no"}}))
    last = (await collect(loop))[-1]
    assert isinstance(last, ev.RunFailed) and (last.code, last.retryable, last.message) == (code, False, message)
    assert waits == []


async def test_cancelling_the_run_cancels_running_tools_and_leaves_no_task() -> None:
    tools = all_tools()
    sleep_tool = tools["sleep"]
    calls = [{"name": "sleep", "input": {"seconds": 30}}, {"name": "sleep", "input": {"seconds": 30}}]
    loop = AgentLoop(scripted({"tool_calls": calls}, {"text": "never"}), Executor(tools))
    before = asyncio.all_tasks()

    async def consume() -> None:
        async for _ in loop.run(spec()):
            pass

    task = asyncio.create_task(consume())
    await asyncio.wait_for(sleep_tool.running.wait(), 5)  # type: ignore[attr-defined]
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sleep_tool.cancelled == 2  # type: ignore[attr-defined]
    assert sleep_tool.finished == 0  # type: ignore[attr-defined]
    assert asyncio.all_tasks() == before


def test_every_domain_event_maps_to_its_protobuf_field() -> None:
    from service.rpc.convert import to_proto

    samples: list[ev.Event] = [
        ev.RunStarted(model="m", tools=("a",), max_turns=1),
        ev.Thinking(turn=1, text="t"),
        ev.TextDelta(turn=1, text="t"),
        ev.ToolCall(turn=1, call_id="c", name="a"),
        ev.ToolCallDelta(call_id="c", partial_json="{"),
        ev.ToolCallReady(call_id="c", name="a", input={"x": [1, "y", None]}),
        ev.ToolResultChunk(call_id="c", index=0, total=None, data={"k": 1}),
        ev.ToolRetry(call_id="c", attempt=1, max_attempts=3, wait_s=0.25, error="boom"),
        ev.ToolFallback(call_id="c", primary="a", fallback="b", reason="down"),
        ev.ToolResult(call_id="c", name="a", status=ev.ToolStatus.PARTIAL, duration_s=0.5, data=[1]),
        ev.ExecutionFailed(execution_id="x", call_id="c", tool="a", message="m"),
        ev.Usage(turn=1, input_tokens=1, output_tokens=2, total_input_tokens=1, total_output_tokens=2),
        ev.FinalResponse(
            text="t", stop_reason="end_turn", turns=1, tool_calls=0, input_tokens=1, output_tokens=1, duration_s=1
        ),
        ev.RunFailed(code="UNAVAILABLE", message="m", retryable=True),
    ]
    fields = [to_proto(e, "run_x", i + 1).WhichOneof("event") for i, e in enumerate(samples)]
    assert fields == [
        "run_started", "thinking", "text_delta", "tool_call", "tool_call_delta", "tool_call_ready",
        "tool_result_chunk", "tool_retry", "tool_fallback", "tool_result", "execution_failed", "usage",
        "final_response", "error",
    ]  # fmt: skip
    assert fields == [e.kind for e in samples]  # each event names the field it becomes
    retry = to_proto(samples[7], "run_x", 8).tool_retry
    assert retry.wait.ToNanoseconds() == 250_000_000
    result = to_proto(samples[9], "run_x", 10).tool_result
    assert result.status == 4 and list(result.data.list_value.values)[0].number_value == 1


async def test_deadline_cancels_running_tools_and_ends_with_deadline_exceeded() -> None:
    from service.control import RunControl

    tools = all_tools()
    calls = [{"name": "sleep", "input": {"seconds": 30}}, {"name": "echo", "input": {"text": "quick"}}]
    loop = AgentLoop(scripted({"tool_calls": calls}, {"text": "never"}), Executor(tools))
    control = RunControl(deadline=asyncio.get_running_loop().time() + 0.2)
    events = [e async for e in loop.run(spec(), control)]
    results = {r.name: r for r in of(events, ev.ToolResult)}
    assert results["echo"].status is ev.ToolStatus.OK
    assert results["sleep"].status is ev.ToolStatus.CANCELLED
    assert results["sleep"].error == "cancelled: the run's deadline passed before it finished"
    assert tools["sleep"].cancelled == 1  # type: ignore[attr-defined]
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and last.code == "DEADLINE_EXCEEDED"


async def test_a_tool_retry_that_would_outlast_the_deadline_leaves_the_model_the_tools_error() -> None:
    from fake_tools import policy_tools
    from service.control import RunControl
    from service.policy.config import resolve

    tools = policy_tools(failures=9)
    policies = resolve(tools, {"flaky": {"retry": {"attempts": 3, "initial_backoff_s": 30, "max_backoff_s": 60}}})
    model = scripted({"tool_calls": [{"name": "flaky", "input": {"text": "x"}}]}, {"text": "done"})
    loop = AgentLoop(model, Executor(tools, policies=policies))
    control = RunControl(deadline=asyncio.get_running_loop().time() + 10)
    events = [e async for e in loop.run(spec(tools=tuple(tools)), control)]
    (result,) = of(events, ev.ToolResult)
    assert result.status is ev.ToolStatus.ERROR and "not retried: the run's deadline is" in result.error
    assert not of(events, ev.ToolRetry) and isinstance(events[-1], ev.FinalResponse)


async def test_no_tool_call_starts_when_the_deadline_is_too_close() -> None:
    from service.control import RunControl

    tools = all_tools()
    model = scripted({"tool_calls": [{"name": "sleep", "input": {"seconds": 1}}]}, {"text": "never"})
    loop = AgentLoop(model, Executor(tools))
    control = RunControl(deadline=asyncio.get_running_loop().time() + 10, min_tool_budget_s=60)
    events = [e async for e in loop.run(spec(), control)]
    assert tools["sleep"].started == 0  # type: ignore[attr-defined]
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and last.code == "DEADLINE_EXCEEDED"
    assert "not starting 1 tool call(s)" in last.message


async def test_stop_now_and_stop_after_turn() -> None:
    from service.control import RunControl
    from service.errors import RunCancelled

    calls = [{"name": "sleep", "input": {"seconds": 0.05}}]
    turns = [{"tool_calls": calls}, {"tool_calls": calls}, {"text": "end"}]
    # after the turn: the first turn's tool finishes, then the run stops before the second model turn
    tools = all_tools()
    model = scripted(*turns)
    control = RunControl()
    loop = AgentLoop(model, Executor(tools))
    events = []
    async for event in loop.run(spec(), control):
        events.append(event)
        if isinstance(event, ev.ToolCallReady):
            control.stop_after_turn(RunCancelled("cancelled after the current turn"))
    assert [r.status for r in of(events, ev.ToolResult)] == [ev.ToolStatus.OK]
    assert len(model.requests) == 1
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and (last.code, last.message) == (
        "CANCELLED",
        "cancelled after the current turn",
    )
    # now: the running tool is cancelled at once
    tools = all_tools()
    control = RunControl()
    loop = AgentLoop(scripted(*turns), Executor(tools))
    events = []
    async for event in loop.run(spec(), control):
        events.append(event)
        if isinstance(event, ev.ToolCallReady):
            control.stop_now(RunCancelled("cancelled by the caller"))
    assert [r.status for r in of(events, ev.ToolResult)] == [ev.ToolStatus.CANCELLED]
    assert tools["sleep"].cancelled == 1  # type: ignore[attr-defined]
    assert isinstance(events[-1], ev.RunFailed) and events[-1].code == "CANCELLED"


async def test_tool_call_budget() -> None:
    calls = [{"name": "echo", "input": {"text": "a"}}, {"name": "echo", "input": {"text": "b"}}]
    loop, _ = make_loop(scripted({"tool_calls": calls}, {"tool_calls": calls}, {"text": "end"}))
    events = await collect(loop, spec(max_tool_calls=3))
    ran, refused = of(events, ev.ToolResult)[:2], of(events, ev.ToolResult)[2:]
    assert [r.status for r in ran] == [ev.ToolStatus.OK] * 2
    # the second turn's calls began (the caller saw them) but did not run: each still gets its result
    assert [r.call_id for r in refused] == [c.call_id for c in of(events, ev.ToolCall)[2:]]
    assert all(r.status is ev.ToolStatus.REJECTED and r.attempts == 0 for r in refused)
    assert all(r.error.startswith("not run: the model asked for 2 more tool call(s)") for r in refused)
    last = events[-1]
    assert isinstance(last, ev.RunFailed) and last.code == "RESOURCE_EXHAUSTED"
    assert "max_tool_calls=3" in last.message


async def test_a_callers_cancel_is_logged_as_info_a_missed_deadline_as_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from service.control import RunControl
    from service.errors import DeadlineExceeded, RunCancelled, RunError

    calls = [{"name": "sleep", "input": {"seconds": 30}}]
    reasons: list[tuple[RunError, str]] = [
        (RunCancelled("the caller cancelled or disconnected"), "INFO"),
        (DeadlineExceeded("the run's deadline passed before it finished"), "WARNING"),
    ]
    for reason, level in reasons:
        control = RunControl()
        loop = AgentLoop(scripted({"tool_calls": calls}, {"text": "never"}), Executor(all_tools()))
        caplog.clear()
        with caplog.at_level("INFO", logger="service.loop"):
            async for event in loop.run(spec(), control):
                if isinstance(event, ev.ToolCallReady):
                    control.stop_now(reason)
        stopped = [r for r in caplog.records if r.getMessage().startswith("run stopped")]
        assert [(r.levelname, r.code) for r in stopped] == [(level, reason.code)]  # type: ignore[attr-defined]


class TimingOutModel:
    """Raises TimeoutError, as an SDK or socket timeout an adapter let through would, `times` times (after streaming
    `first` text when given), then plays `then`."""

    def __init__(self, then: ScriptedModel, *, times: int, first: str = "") -> None:
        self.then = then
        self.times = times
        self.first = first
        self.calls = 0

    @property
    def default_model(self) -> str:
        return "timing-out"

    async def aclose(self) -> None:
        pass

    async def stream_turn(self, request: m.TurnRequest) -> AsyncGenerator[m.ModelEvent, None]:
        self.calls += 1
        if self.calls <= self.times:
            if self.first:
                yield m.TextDelta(text=self.first)
            raise TimeoutError("The read operation timed out")
        async for event in self.then.stream_turn(request):
            yield event


async def test_a_model_timeout_is_retried_not_taken_for_the_runs_deadline() -> None:
    from service.control import RunControl

    model = TimingOutModel(scripted({"text": "fine"}), times=2)
    loop, waits = make_loop(model)
    events = [e async for e in loop.run(spec(), RunControl(deadline=None))]
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "fine"
    assert model.calls == 3 and len(waits) == 2


async def test_a_model_that_keeps_timing_out_is_unavailable() -> None:
    loop, waits = make_loop(TimingOutModel(scripted({"text": "never"}), times=9), attempts=3)
    last = (await collect(loop))[-1]
    assert isinstance(last, ev.RunFailed)
    assert (last.code, last.retryable) == ("UNAVAILABLE", True)
    assert last.message == "model turn 1 failed after 3 attempt(s): the model timed out: The read operation timed out"
    assert len(waits) == 2


async def test_a_model_timeout_after_streaming_is_not_retried() -> None:
    model = TimingOutModel(scripted({"text": "never"}), times=1, first="partial ")
    loop, waits = make_loop(model)
    last = (await collect(loop))[-1]
    assert isinstance(last, ev.RunFailed) and (last.code, last.retryable) == ("UNAVAILABLE", True)
    assert "after part of it was streamed" in last.message
    assert waits == [] and model.calls == 1


async def test_a_timeout_error_the_scope_did_not_raise_is_a_crash_not_a_deadline() -> None:
    """Anything but the model raising TimeoutError inside the run is a bug: the registry reports it as INTERNAL with
    the traceback, rather than the loop claiming a deadline passed."""

    class BrokenExecutor(Executor):
        async def execute(self, call: Any, run: Any) -> AsyncGenerator[ev.Event, None]:
            raise TimeoutError("not the run's")
            yield

    model = scripted({"tool_calls": [{"name": "echo", "input": {"text": "x"}}]}, {"text": "never"})
    loop = AgentLoop(model, BrokenExecutor(all_tools()))
    with pytest.raises(TimeoutError, match="not the run's"):
        await collect(loop)


async def test_a_tool_raising_timeout_error_is_a_tool_result() -> None:
    class TimesOut(Tool[EchoInput]):
        name = "times_out"
        description = "Its upstream times out."
        Input = EchoInput

        async def run(self, args: EchoInput) -> JSON:
            raise TimeoutError("upstream read timed out")

    tools = {**all_tools(), "times_out": TimesOut()}
    model = scripted({"tool_calls": [{"name": "times_out", "input": {"text": "x"}}]}, {"text": "recovered"})
    loop = AgentLoop(model, Executor(tools))
    events = await collect(loop, spec(tools=("times_out",)))
    (result,) = of(events, ev.ToolResult)
    assert result.status is ev.ToolStatus.TIMEOUT
    assert isinstance(events[-1], ev.FinalResponse) and events[-1].text == "recovered"


def test_a_tool_error_quoting_a_lone_surrogate_goes_back_to_the_model_as_utf8() -> None:
    """A tool's error may quote what it read (a remote body, a program's stderr); the history must stay UTF-8."""
    result = ev.ToolResult(call_id="c", name="t", status=ev.ToolStatus.ERROR, duration_s=0, error="bad \ud800 byte")
    assert tool_result_block(result)["content"] == "error: bad \ufffd byte"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": "hello"}],
        [
            {"role": "user", "content": 'naïve ☃ "quoted"\n'},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "x", "input": {"n": 1.5}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [1, None, True]}]},
        ],
        [],
    ],
)
def test_the_scripted_token_estimate_reads_the_request_as_json_dumps_writes_it(messages: list[Any]) -> None:
    assert json_length(messages) == len(json.dumps(messages))
    with pytest.raises(TypeError):  # what json.dumps refuses
        json_length([{"content": object()}])


class _LongAnswer:
    """A model whose one turn answers `text`."""

    default_model = "long"

    def __init__(self, text: str) -> None:
        self.text = text

    async def stream_turn(self, request: m.TurnRequest) -> AsyncGenerator[m.ModelEvent, None]:
        yield m.TextDelta(text=self.text)
        yield m.TurnEnd(
            stop_reason="end_turn", content=[{"type": "text", "text": self.text}], input_tokens=1, output_tokens=1
        )

    async def aclose(self) -> None:
        pass


async def test_an_answer_past_1_mib_is_cut_in_final_response_not_in_its_deltas() -> None:
    """An outside finding: a 5 MiB answer went out as one final_response, past the 4 MiB a gRPC client accepts."""
    text = "é" * 600_000  # 1.2 MB of UTF-8, 2 bytes a character
    loop, _ = make_loop(_LongAnswer(text))
    events = await collect(loop)
    assert "".join(d.text for d in of(events, ev.TextDelta)) == text  # the deltas carry all of it
    (final,) = of(events, ev.FinalResponse)
    kept, _, note = final.text.partition("\n[cut:")
    assert len(kept.encode()) <= 1 << 20 and text.startswith(kept) and len(kept) == (1 << 20) // 2
    assert note.startswith(" the answer is longer than 1 MiB")
    short = "fine " * 1000
    (final,) = of(await collect(make_loop(_LongAnswer(short))[0]), ev.FinalResponse)
    assert final.text == short
