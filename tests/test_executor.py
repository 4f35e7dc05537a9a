"""The executor's stages end to end on one call: exact event sequences for retries, fallbacks, timeouts, rate limits,
breakers, caching, dependencies and dead letters, with injected sleep and clock (no real waiting)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from fake_tools import policy_tools
from service import events as ev
from service.executor import Executor, RunContext, ToolCallRequest
from service.policy.config import resolve
from service.records.audit import AuditLog, verify
from service.records.deadletter import DeadLetterStore
from tools.base import JSON, Tool, ToolError

S = ev.ToolStatus


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def executor(
    tools: dict[str, Tool[Any]] | None = None, overrides: dict[str, Any] | None = None, **kwargs: Any
) -> tuple[Executor, list[float]]:
    tools = tools if tools is not None else policy_tools()
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)

    kwargs.setdefault("sleep", sleep)
    return Executor(tools, policies=resolve(tools, overrides or {}), timeout_s=5, **kwargs), waits


def run_ctx(tools: Any, **kwargs: Any) -> RunContext:
    return RunContext(run_id="run_t", offered=frozenset(tools), **kwargs)


async def call(ex: Executor, name: str, input: dict[str, Any], run: RunContext | None = None) -> list[ev.Event]:
    request = ToolCallRequest(call_id="c1", name=name, input=input)
    return [e async for e in ex.execute(request, run or run_ctx(ex.tools))]


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


async def test_flaky_tool_is_retried_with_backoff_until_it_works() -> None:
    ex, waits = executor(overrides={"flaky": {"retry": {"attempts": 3, "initial_backoff_s": 0.1}}})
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ToolRetry", "ToolResult"]
    r1, r2, result = events[1], events[2], events[3]
    assert isinstance(r1, ev.ToolRetry) and isinstance(r2, ev.ToolRetry) and isinstance(result, ev.ToolResult)
    assert (r1.attempt, r1.max_attempts, r1.error) == (1, 3, "upstream 503 (call 1)")
    assert (r2.attempt, r2.max_attempts) == (2, 3)
    assert waits == [r1.wait_s, r2.wait_s] and 0.1 <= r1.wait_s <= 0.2 and 0.2 <= r2.wait_s <= 0.3
    assert (result.status, result.attempts, result.data) == (S.OK, 3, {"echo": "x", "calls": 3})


async def test_non_retryable_errors_and_exhausted_retries_end_in_error() -> None:
    tools = policy_tools(failures=9, retryable=False)
    ex, waits = executor(tools, {"flaky": {"retry": {"attempts": 3}}})
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolResult"] and waits == []
    ex, waits = executor(policy_tools(failures=9), {"flaky": {"retry": {"attempts": 2}}})
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ToolResult"]
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and (result.status, result.attempts) == (S.ERROR, 2)


async def test_dead_letter_is_stored_before_execution_failed_goes_out(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.db")
    ex, _ = executor(policy_tools(failures=9), {"flaky": {"retry": {"attempts": 2}}}, dead_letter=store)
    events = await call(ex, "flaky", {"text": "boom"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ExecutionFailed", "ToolResult"]
    failed = events[2]
    assert isinstance(failed, ev.ExecutionFailed) and failed.tool == "flaky"
    assert failed.message == "flaky failed after 2 attempt(s): upstream 503 (call 2)"
    letter = store.get(failed.execution_id)
    assert letter is not None
    assert (letter.run_id, letter.call_id, letter.input, letter.attempts) == ("run_t", "c1", {"text": "boom"}, 2)
    assert (letter.error_type, letter.status) == ("ToolError", "error") and "ToolError" in letter.traceback
    ok, _ = executor(dead_letter=store)
    assert "ExecutionFailed" not in kinds(await call(ok, "echo", {"text": "fine"}))  # only failures
    store.close()


async def test_validation_errors_are_rejected_and_never_trip_the_breaker() -> None:
    ex, _ = executor(overrides={"flaky": {"breaker": {"failure_threshold": 1}}})
    for _ in range(3):
        events = await call(ex, "flaky", {"text": "x", "times": 99})
        assert kinds(events) == ["ToolResult"] and events[0].status is S.REJECTED  # type: ignore[union-attr]
    breaker = ex.guards["flaky"].breaker
    assert breaker is not None and breaker.state.value == "closed"


async def test_open_circuit_refuses_at_once_then_half_open_trial_closes_it() -> None:
    clock = Clock()
    tools = policy_tools(failures=2)
    ex, _ = executor(tools, {"flaky": {"breaker": {"failure_threshold": 2, "cooldown_s": 30}}}, clock=clock)
    for _ in range(2):
        await call(ex, "flaky", {"text": "x"})
    events = await call(ex, "flaky", {"text": "x"})
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.CIRCUIT_OPEN
    assert "unavailable (circuit open" in result.error and result.attempts == 0
    assert tools["flaky"].calls == 2  # type: ignore[attr-defined]
    clock.now += 30
    events = await call(ex, "flaky", {"text": "x"})
    assert events[-1].status is S.OK  # type: ignore[union-attr]
    assert ex.guards["flaky"].breaker.state.value == "closed"  # type: ignore[union-attr]


async def test_a_failure_that_opens_the_circuit_is_not_retried_and_is_dead_lettered(tmp_path: Path) -> None:
    """It was retried into the open circuit: a tool_retry and a backoff for nothing, then CIRCUIT_OPEN in place of
    the tool's own error, and no dead letter though the tool had run and failed."""
    store = DeadLetterStore(tmp_path / "dl.db")
    overrides = {"flaky": {"retry": {"attempts": 3}, "breaker": {"failure_threshold": 1, "cooldown_s": 30}}}
    ex, waits = executor(policy_tools(failures=9), overrides, dead_letter=store, clock=Clock())
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ExecutionFailed", "ToolResult"] and waits == []
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and (result.status, result.attempts) == (S.ERROR, 1)
    assert result.error == "upstream 503 (call 1); not retried: flaky's circuit opened"
    assert store.get(events[1].execution_id) is not None  # type: ignore[union-attr]
    store.close()


async def test_a_circuit_opened_during_the_backoff_ends_the_call_with_its_last_failure() -> None:
    tools = policy_tools(failures=9)
    ex, _ = executor(tools, {"flaky": {"retry": {"attempts": 3}, "breaker": {"failure_threshold": 2}}}, clock=Clock())
    breaker = ex.guards["flaky"].breaker
    assert breaker is not None

    async def another_call_fails(seconds: float) -> None:
        permit = breaker.allow()
        assert permit is not None
        breaker.failure(permit)  # the second failure in a row: the circuit opens

    ex.sleep = another_call_fails
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ToolResult"]
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and (result.status, result.attempts) == (S.ERROR, 1)
    assert result.error == "upstream 503 (call 1); not retried: flaky's circuit refused the call (open)"
    assert tools["flaky"].calls == 1  # type: ignore[attr-defined]


async def test_a_half_open_circuit_whose_trial_is_taken_is_named_as_such() -> None:
    tools = policy_tools(failures=9)
    overrides = {"flaky": {"retry": {"attempts": 3}, "breaker": {"failure_threshold": 5, "cooldown_s": 0}}}
    ex, _ = executor(tools, overrides, clock=Clock())
    breaker = ex.guards["flaky"].breaker
    assert breaker is not None

    async def another_call_takes_the_trial(seconds: float) -> None:
        for _ in range(5):  # five failures in a row open it; with no cooldown it is half-open at once
            permit = breaker.allow()
            assert permit is not None
            breaker.failure(permit)
        assert breaker.allow() is not None  # the one trial call: taken, and still running

    ex.sleep = another_call_takes_the_trial
    result = (await call(ex, "flaky", {"text": "x"}))[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.ERROR
    assert result.error == "upstream 503 (call 1); not retried: flaky's circuit refused the call (half_open)"


class GateInput(BaseModel):
    mode: Literal["ok", "fail", "hang"]


class Gate(Tool[GateInput]):
    """Answers, fails, or hangs until cancelled, as asked; `entered` counts hanging calls that have started."""

    name = "gate"
    description = "Answers, fails or hangs."
    Input = GateInput

    def __init__(self) -> None:
        self.entered = asyncio.Semaphore(0)

    async def run(self, args: GateInput) -> JSON:
        if args.mode == "fail":
            raise ToolError("upstream down", retryable=True)
        if args.mode == "hang":
            self.entered.release()
            await asyncio.Event().wait()
        return {"ok": True}


async def test_a_cancelled_call_from_before_the_circuit_opened_leaves_the_trial_slot_alone() -> None:
    clock, gate = Clock(), Gate()
    ex, _ = executor({"gate": gate}, {"gate": {"breaker": {"failure_threshold": 1, "cooldown_s": 10}}}, clock=clock)
    old = asyncio.create_task(call(ex, "gate", {"mode": "hang"}))  # admitted while closed
    await gate.entered.acquire()
    assert (await call(ex, "gate", {"mode": "fail"}))[-1].status is S.ERROR  # type: ignore[union-attr]
    clock.now += 10
    trial = asyncio.create_task(call(ex, "gate", {"mode": "hang"}))  # half-open: takes the one trial slot
    await gate.entered.acquire()
    assert (await call(ex, "gate", {"mode": "ok"}))[-1].status is S.CIRCUIT_OPEN  # type: ignore[union-attr]
    old.cancel()  # e.g. its run was cancelled
    with pytest.raises(asyncio.CancelledError):
        await old
    # Were the slot freed, this call would run beside the trial (and its success would close the circuit).
    assert (await call(ex, "gate", {"mode": "ok"}))[-1].status is S.CIRCUIT_OPEN  # type: ignore[union-attr]
    trial.cancel()  # the trial's own cancel does free it
    with pytest.raises(asyncio.CancelledError):
        await trial
    assert (await call(ex, "gate", {"mode": "ok"}))[-1].status is S.OK  # type: ignore[union-attr]
    assert ex.guards["gate"].breaker.state.value == "closed"  # type: ignore[union-attr]


async def test_fallback_answers_when_the_primary_finally_fails() -> None:
    tools = policy_tools(failures=9)
    ex, _ = executor(tools, {"flaky": {"retry": {"attempts": 2}, "fallback": "backup"}})
    events = await call(ex, "flaky", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ToolFallback", "ToolResult"]
    fallback, result = events[2], events[3]
    assert isinstance(fallback, ev.ToolFallback) and isinstance(result, ev.ToolResult)
    assert (fallback.primary, fallback.fallback, fallback.reason) == ("flaky", "backup", "upstream 503 (call 2)")
    assert (result.name, result.status, result.answered_by, result.data) == ("flaky", S.OK, "backup", {"backup": "x"})
    assert result.attempts == 3


async def test_no_fallback_to_a_tool_the_run_was_not_offered() -> None:
    """A caller without rights to the fallback (or that left it out of its tools) must not get its answers."""
    tools = policy_tools(failures=9)
    ex, _ = executor(tools, {"flaky": {"retry": {"attempts": 1}, "fallback": "backup"}})
    events = await call(ex, "flaky", {"text": "x"}, RunContext(run_id="r", offered=frozenset({"flaky"})))
    assert kinds(events) == ["ToolCallReady", "ToolResult"]
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.ERROR and not result.answered_by
    assert result.error == "upstream 503 (call 1); fallback backup is not offered to this run, so it was not tried"
    assert tools["backup"].calls == 0  # type: ignore[attr-defined]


async def test_no_retry_whose_backoff_ends_after_the_runs_deadline() -> None:
    """Waiting would only see the run stopped and the call end CANCELLED: it ends with its own error instead."""
    tools = policy_tools(failures=9)
    ex, waits = executor(tools, {"flaky": {"retry": {"attempts": 3, "initial_backoff_s": 0.2}}})
    run = RunContext(run_id="r", offered=frozenset(tools), remaining=lambda: 0.15)
    events = await call(ex, "flaky", {"text": "x"}, run)
    assert kinds(events) == ["ToolCallReady", "ToolResult"] and waits == []
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.ERROR and result.attempts == 1
    assert result.error.startswith("upstream 503 (call 1); not retried: the run's deadline is 0.15 s away, the backoff")
    run = RunContext(run_id="r", offered=frozenset(tools), remaining=lambda: 60.0)
    assert kinds(await call(ex, "flaky", {"text": "x"}, run)).count("ToolRetry") == 2  # time enough: retried


async def test_no_fallback_before_its_own_prerequisites_succeeded() -> None:
    tools = policy_tools(failures=9)
    ex, _ = executor(
        tools, {"flaky": {"retry": {"attempts": 1}, "fallback": "backup"}, "backup": {"requires": ["echo"]}}
    )
    run = run_ctx(tools)
    result = (await call(ex, "flaky", {"text": "x"}, run))[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.ERROR and not result.answered_by
    assert (
        result.error == "upstream 503 (call 1); fallback backup can only run after echo succeeded, so it was not tried"
    )
    assert tools["backup"].calls == 0  # type: ignore[attr-defined]
    run.succeeded.add("echo")
    result = (await call(ex, "flaky", {"text": "x"}, run))[-1]
    assert isinstance(result, ev.ToolResult) and result.answered_by == "backup"


async def test_open_circuit_goes_straight_to_the_fallback() -> None:
    tools = policy_tools(failures=9)
    overrides = {"flaky": {"breaker": {"failure_threshold": 1, "cooldown_s": 60}, "fallback": "backup"}}
    ex, _ = executor(tools, overrides, clock=Clock())
    await call(ex, "flaky", {"text": "x"})  # opens the circuit (and falls back)
    events = await call(ex, "flaky", {"text": "y"})
    assert kinds(events) == ["ToolCallReady", "ToolFallback", "ToolResult"]
    assert "circuit open" in events[1].reason  # type: ignore[union-attr]
    assert events[-1].answered_by == "backup"  # type: ignore[union-attr]
    assert tools["flaky"].calls == 1  # type: ignore[attr-defined]


async def test_failed_fallback_keeps_the_primary_error(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "dl.db")
    ex, _ = executor(overrides={"hang": {"timeout": {"seconds": 0.01}, "fallback": "buggy"}}, dead_letter=store)
    events = await call(ex, "hang", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolFallback", "ExecutionFailed", "ToolResult"]
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.TIMEOUT and not result.answered_by
    assert result.error == "hang did not finish within 0.01 s; fallback buggy also failed: internal error in " + (
        "tool buggy: ZeroDivisionError"
    )
    store.close()


async def test_soft_timeout_returns_the_chunks_so_far_and_hard_cancels() -> None:
    ex, _ = executor(overrides={"stream_hang": {"timeout": {"seconds": 0.05, "mode": "soft"}}})
    events = await call(ex, "stream_hang", {"n": 2})
    assert kinds(events) == ["ToolCallReady", "ToolResultChunk", "ToolResultChunk", "ToolResult"]
    result = events[-1]
    assert isinstance(result, ev.ToolResult) and result.status is S.PARTIAL
    assert result.data == [{"i": 0}, {"i": 1}] and "2 chunk(s)" in result.error
    tools = policy_tools()
    ex, _ = executor(tools, {"hang": {"timeout": {"seconds": 0.02, "mode": "soft"}}})
    events = await call(ex, "hang", {"text": "x"})  # soft, but nothing to return: a timeout
    assert events[-1].status is S.TIMEOUT  # type: ignore[union-attr]
    assert tools["hang"].cancelled == 1  # type: ignore[attr-defined]


async def test_timeouts_are_retried_but_not_after_chunks_went_out() -> None:
    tools = policy_tools()
    ex, _ = executor(tools, {"hang": {"timeout": {"seconds": 0.01}, "retry": {"attempts": 2}}})
    events = await call(ex, "hang", {"text": "x"})
    assert kinds(events) == ["ToolCallReady", "ToolRetry", "ToolResult"]
    assert tools["hang"].calls == 2  # type: ignore[attr-defined]
    ex, _ = executor(overrides={"stream_hang": {"timeout": {"seconds": 0.02}, "retry": {"attempts": 3}}})
    events = await call(ex, "stream_hang", {"n": 1})
    assert kinds(events) == ["ToolCallReady", "ToolResultChunk", "ToolResult"]  # a retry would repeat the chunk


async def test_rate_limit_rejects_with_a_result_the_model_can_read() -> None:
    ex, _ = executor(overrides={"echo": {"rate_limit": {"rate_per_s": 0.1, "burst": 1, "mode": "reject"}}})
    assert (await call(ex, "echo", {"text": "a"}))[-1].status is S.OK  # type: ignore[union-attr]
    events = await call(ex, "echo", {"text": "b"})
    result = events[-1]
    assert kinds(events) == ["ToolCallReady", "ToolResult"]
    assert isinstance(result, ev.ToolResult) and result.status is S.RATE_LIMITED
    assert result.error == "echo is rate limited (0.1/s, burst 1); try again later or use another approach"


async def test_idempotent_tool_results_are_cached_per_input() -> None:
    tools = policy_tools()
    ex, _ = executor(tools, {"counted": {"idempotent": True, "cache": {"ttl_s": 60}}}, clock=Clock())
    first = (await call(ex, "counted", {"text": "a"}))[-1]
    second = (await call(ex, "counted", {"times": 1, "text": "a"}))[-1]  # same input, other key order
    other = (await call(ex, "counted", {"text": "b"}))[-1]
    assert isinstance(first, ev.ToolResult) and isinstance(second, ev.ToolResult) and isinstance(other, ev.ToolResult)
    assert (first.cache_hit, second.cache_hit, other.cache_hit) == (False, True, False)
    assert second.data == first.data and tools["counted"].calls == 2  # type: ignore[attr-defined]


async def test_requires_refuses_a_call_until_its_prerequisite_succeeded() -> None:
    ex, _ = executor(overrides={"counted": {"requires": ["echo"]}})
    run = run_ctx(ex.tools)
    events = await call(ex, "counted", {"text": "a"}, run)
    assert kinds(events) == ["ToolResult"] and events[0].status is S.REJECTED  # type: ignore[union-attr]
    assert events[0].error == "counted can only run after echo succeeded in this run: call echo first"  # type: ignore[union-attr]
    run.succeeded.add("echo")
    assert (await call(ex, "counted", {"text": "a"}, run))[-1].status is S.OK  # type: ignore[union-attr]


async def test_cancel_during_retry_wait_propagates_and_stops_retrying() -> None:
    tools = policy_tools(failures=9)
    ex, _ = executor(tools, {"flaky": {"retry": {"attempts": 5}}}, sleep=asyncio.sleep)
    ex.guards["flaky"].backoff.wait = lambda attempt: 30.0  # type: ignore[method-assign]
    task = asyncio.create_task(call(ex, "flaky", {"text": "x"}))
    for _ in range(100):
        if tools["flaky"].calls:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.001)
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert tools["flaky"].calls == 1  # type: ignore[attr-defined]


async def test_every_call_is_audited(tmp_path: Path) -> None:
    audit = AuditLog(tmp_path / "audit.db")
    ex, _ = executor(audit=audit)
    run = run_ctx(ex.tools, metadata={"caller": "risk"})
    await call(ex, "echo", {"text": "a"}, run)
    await call(ex, "echo", {"text": "a", "times": 9}, run)
    await ex.aclose()
    verdict = verify(tmp_path / "audit.db")
    assert verdict.ok and verdict.rows == 2


async def test_slow_calls_log_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    ex, _ = executor(overrides={"sleep": {"slow_s": 0.01}})
    with caplog.at_level(logging.WARNING, logger="service.executor"):
        await call(ex, "sleep", {"seconds": 0.02})
    slow = next(r for r in caplog.records if r.getMessage() == "tool call slow")
    assert slow.tool == "sleep" and slow.elapsed_ms >= 20 and slow.slow_s == 0.01  # type: ignore[attr-defined]
