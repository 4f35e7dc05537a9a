"""A tool call's metrics (calls by outcome, latency, rate-limit wait) go through the tally (service/tally.py): no
Prometheus lock per call, and a scrape shows every call all the same."""

from __future__ import annotations

from prometheus_client import REGISTRY

from fake_tools import policy_tools
from service.executor import Executor, RunContext, ToolCallRequest
from service.policy.config import resolve
from service.telemetry import RATE_LIMIT_WAIT, TOOL_CALLS, TOOL_LATENCY


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0  # a scrape: the tally is flushed first


async def test_a_call_is_counted_without_writing_to_the_metrics_until_a_scrape() -> None:
    tools = policy_tools()
    overrides = {"echo": {"rate_limit": {"rate_per_s": 1000, "burst": 10}}}
    ex = Executor(tools, policies=resolve(tools, overrides), timeout_s=5)
    before = {
        "calls": sample("agent_tool_calls_total", tool="echo", outcome="ok"),
        "latency": sample("agent_tool_call_duration_seconds_count", tool="echo"),
        "waits": sample("agent_tool_rate_limit_wait_seconds_count", tool="echo"),
        "fast": sample("agent_tool_rate_limit_wait_seconds_bucket", tool="echo", le="0.001"),
    }
    written = (
        TOOL_CALLS.labels("echo", "ok")._value.get(),
        TOOL_LATENCY.labels("echo")._sum.get(),
        RATE_LIMIT_WAIT.labels("echo")._buckets[0].get(),
    )
    run = RunContext(run_id="run_m", offered=frozenset(tools))
    for i in range(3):
        request = ToolCallRequest(call_id=f"c{i}", name="echo", input={"text": "a"})
        assert [e async for e in ex.execute(request, run)][-1].status.value == "ok"  # type: ignore[union-attr]
    assert (
        TOOL_CALLS.labels("echo", "ok")._value.get(),
        TOOL_LATENCY.labels("echo")._sum.get(),
        RATE_LIMIT_WAIT.labels("echo")._buckets[0].get(),
    ) == written  # per call, only the tally moved
    after = {
        "calls": sample("agent_tool_calls_total", tool="echo", outcome="ok"),
        "latency": sample("agent_tool_call_duration_seconds_count", tool="echo"),
        "waits": sample("agent_tool_rate_limit_wait_seconds_count", tool="echo"),
        "fast": sample("agent_tool_rate_limit_wait_seconds_bucket", tool="echo", le="0.001"),
    }
    assert {k: after[k] - before[k] for k in after} == {"calls": 3, "latency": 3, "waits": 3, "fast": 3}
