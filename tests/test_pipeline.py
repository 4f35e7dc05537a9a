"""The policy stages without the executor or its recorder: a tool's pipeline driven directly, with an observer that
writes down what it is told, so the stages are seen to decide and to report, and never to record themselves."""

from __future__ import annotations

from typing import Any

from fake_tools import policy_tools
from service import events as ev
from service.policy.attempt import Outcome
from service.policy.breaker import CircuitBreaker
from service.policy.call import RunContext, ToolCallRequest
from service.policy.config import resolve
from service.policy.guards import build_guards
from service.policy.pipeline import Pipeline
from tools.base import Tool

S = ev.ToolStatus


class Notes:
    """A CallObserver that keeps each hook it is told, with the arguments that say what happened."""

    def __init__(self) -> None:
        self.said: list[tuple[Any, ...]] = []

    def cache_hit(self, tool: str) -> None:
        self.said.append(("cache_hit", tool))

    def rate_limited(self, tool: str, waited: float | None) -> None:
        self.said.append(("rate_limited", tool, waited is None))

    def attempt_started(self, number: int) -> None:
        self.said.append(("attempt_started", number))

    def attempt_ended(self, outcome: Outcome, breaker: CircuitBreaker | None) -> None:
        self.said.append(("attempt_ended", outcome.status, outcome.attempts))

    def attempt_aborted(self, exc: BaseException) -> None:
        self.said.append(("attempt_aborted", type(exc).__name__))

    def retrying(self, tool: str, number: int, attempts: int, wait: float, error: str) -> None:
        self.said.append(("retrying", tool, number, attempts))

    def fallback_started(self, primary: str, fallback: str, reason: str) -> None:
        self.said.append(("fallback_started", primary, fallback))

    def fallback_ended(self, outcome: Outcome | BaseException) -> None:
        self.said.append(("fallback_ended", outcome.status if isinstance(outcome, Outcome) else outcome))


def pipeline(tools: dict[str, Tool[Any]], name: str, overrides: dict[str, Any]) -> Pipeline:
    policies = resolve(tools, overrides)
    guards = {n: build_guards(n, p, default_timeout_s=5) for n, p in policies.items()}
    fallback = policies[name].fallback
    return Pipeline(tools[name], guards[name], (tools[fallback], guards[fallback]) if fallback else None)


async def run(pipe: Pipeline, tools: dict[str, Tool[Any]], notes: Notes) -> list[ev.Event | Outcome]:
    async def sleep(seconds: float) -> None:
        return None

    call = ToolCallRequest(call_id="c1", name=pipe.tool.name, input={"text": "x"})
    run = RunContext(run_id="r", offered=frozenset(tools))
    args = pipe.tool.validate(call.input)
    return [item async for item in pipe.run(call, run, args, notes, sleep)]


async def test_retries_then_fallback_are_told_to_the_observer_in_order() -> None:
    tools = policy_tools(failures=9)
    pipe = pipeline(tools, "flaky", {"flaky": {"retry": {"attempts": 2}, "fallback": "backup"}})
    notes = Notes()
    items = await run(pipe, tools, notes)
    assert [type(i).__name__ for i in items] == ["ToolRetry", "ToolFallback", "Outcome"]
    outcome = items[-1]
    assert isinstance(outcome, Outcome) and (outcome.status, outcome.attempts) == (S.OK, 3)
    assert outcome.answered_by == "backup" and not outcome.cache_hit
    assert notes.said == [
        ("attempt_started", 1),
        ("attempt_ended", S.ERROR, 1),
        ("retrying", "flaky", 1, 2),
        ("attempt_started", 2),
        ("attempt_ended", S.ERROR, 2),
        ("fallback_started", "flaky", "backup"),
        ("attempt_started", 1),
        ("attempt_ended", S.OK, 1),
        ("fallback_ended", S.OK),
    ]


async def test_a_cached_result_is_told_as_a_hit_and_nothing_runs() -> None:
    tools = policy_tools()
    pipe = pipeline(tools, "counted", {"counted": {"idempotent": True, "cache": {"ttl_s": 60}}})
    await run(pipe, tools, Notes())
    notes = Notes()
    (outcome,) = await run(pipe, tools, notes)
    assert isinstance(outcome, Outcome) and outcome.status is S.OK and outcome.cache_hit
    assert notes.said == [("cache_hit", "counted")]
    assert tools["counted"].calls == 1  # type: ignore[attr-defined]


async def test_a_refused_rate_limit_is_told_and_no_attempt_is_made() -> None:
    tools = policy_tools()
    pipe = pipeline(tools, "echo", {"echo": {"rate_limit": {"rate_per_s": 0.1, "burst": 1, "mode": "reject"}}})
    await run(pipe, tools, Notes())
    notes = Notes()
    (outcome,) = await run(pipe, tools, notes)
    assert isinstance(outcome, Outcome) and outcome.status is S.RATE_LIMITED
    assert notes.said == [("rate_limited", "echo", True)]
