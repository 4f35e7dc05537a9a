"""The common call's path is lean: a call to a tool that answers in one piece at its first attempt runs through no
async generator but the executor's own; one that must be retried goes on through the pipeline's generators with
the same events as before."""

from __future__ import annotations

import sys
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

from fake_tools import policy_tools
from service import events as ev
from service.executor import Executor, RunContext, ToolCallRequest
from service.policy.config import resolve


@contextmanager
def generators_started() -> Iterator[list[str]]:
    """The names of the async generators started meanwhile (the event loop's own hook still called)."""
    names: list[str] = []
    firstiter, finalizer = sys.get_asyncgen_hooks()

    def hook(gen: AsyncGenerator[Any, Any]) -> None:
        names.append(gen.__qualname__)
        if firstiter is not None:
            firstiter(gen)

    sys.set_asyncgen_hooks(firstiter=hook, finalizer=finalizer)
    try:
        yield names
    finally:
        sys.set_asyncgen_hooks(firstiter=firstiter, finalizer=finalizer)


def executor(overrides: dict[str, Any]) -> Executor:
    tools = policy_tools(failures=1)
    return Executor(tools, policies=resolve(tools, overrides), timeout_s=5, sleep=lambda s: nothing())


async def nothing() -> None:
    return None


async def events(ex: Executor, name: str) -> list[ev.Event]:
    request = ToolCallRequest(call_id="c1", name=name, input={"text": "a"})
    return [e async for e in ex.execute(request, RunContext(run_id="r", offered=frozenset(ex.tools)))]


async def test_a_call_that_works_at_once_runs_through_the_executors_generator_only() -> None:
    ex = executor({"echo": {"rate_limit": {"rate_per_s": 1000, "burst": 10}, "breaker": {}}})
    with generators_started() as started:
        got = await events(ex, "echo")
    assert [type(e).__name__ for e in got] == ["ToolCallReady", "ToolResult"]
    assert started == ["Executor.execute"]


async def test_a_retried_call_goes_on_from_its_first_attempt() -> None:
    ex = executor({"flaky": {"retry": {"attempts": 3}}})
    with generators_started() as started:
        got = await events(ex, "flaky")
    assert [type(e).__name__ for e in got] == ["ToolCallReady", "ToolRetry", "ToolResult"]
    result = got[-1]
    assert isinstance(result, ev.ToolResult) and (result.status, result.attempts) == (ev.ToolStatus.OK, 2)
    assert started == ["Executor.execute", "Pipeline.run", "guarded"]
