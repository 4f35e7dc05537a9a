"""Two real services on one Redis prefix, as two replicas: what one learns of a tool through its breaker, its rate
limit or its cache holds on the other (and, with `scope: process`, only on itself)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest
from backends import RedisNamespace

from agent.v1 import agent_pb2 as pb
from conftest import StartService, run_events
from fake_tools import policy_tools
from service.rpc.server import Service

ChannelTo = Callable[[Service], grpc.aio.Channel]


def calls(tool: str, n: int = 1) -> list[dict[str, Any]]:
    """A scenario: one turn calling `tool` n times, then an answer."""
    return [
        {"text": "Calling.", "tool_calls": [{"name": tool, "input": {"text": f"x{i}"}} for i in range(n)]},
        {"text": "Done: {results}"},
    ]


async def statuses(channel: grpc.aio.Channel) -> list[int]:
    events = await run_events(channel)
    return [e.tool_result.status for e in events if e.HasField("tool_result")]


@pytest.mark.parametrize("scope", ["fleet", "process"])
async def test_a_breaker_opened_on_one_replica_refuses_on_the_other(
    start_service: StartService, channel_to: ChannelTo, redis_ns: RedisNamespace, scope: str
) -> None:
    config: dict[str, Any] = {
        "state": {"url": redis_ns.url, "prefix": redis_ns.prefix},
        "policies": {"buggy": {"breaker": {"failure_threshold": 1, "cooldown_s": 600, "scope": scope}}},
    }
    a = await start_service(calls("buggy"), **config)
    b = await start_service(calls("buggy"), **config)
    assert await statuses(channel_to(a)) == [pb.TOOL_STATUS_ERROR]  # the bug opens the circuit
    assert await statuses(channel_to(a)) == [pb.TOOL_STATUS_CIRCUIT_OPEN]
    expected = pb.TOOL_STATUS_CIRCUIT_OPEN if scope == "fleet" else pb.TOOL_STATUS_ERROR
    assert await statuses(channel_to(b)) == [expected]


async def test_a_rate_limit_holds_for_two_replicas_together(
    start_service: StartService, channel_to: ChannelTo, redis_ns: RedisNamespace
) -> None:
    config: dict[str, Any] = {
        "state": {"url": redis_ns.url, "prefix": redis_ns.prefix},
        "policies": {"echo": {"rate_limit": {"rate_per_s": 0.001, "burst": 2, "mode": "reject"}}},
    }
    a = await start_service(calls("echo", 2), **config)
    b = await start_service(calls("echo", 1), **config)
    assert await statuses(channel_to(a)) == [pb.TOOL_STATUS_OK] * 2  # the fleet's burst
    assert await statuses(channel_to(b)) == [pb.TOOL_STATUS_RATE_LIMITED]


async def test_a_result_cached_on_one_replica_answers_on_the_other(
    start_service: StartService, channel_to: ChannelTo, redis_ns: RedisNamespace
) -> None:
    config: dict[str, Any] = {
        "state": {"url": redis_ns.url, "prefix": redis_ns.prefix, "shared_cache": True},
        "policies": {"counted": {"side_effects": "none", "cache": {"ttl_s": 60}}},
    }
    tools_a, tools_b = policy_tools(), policy_tools()
    a = await start_service(calls("counted"), tools=tools_a, **config)
    b = await start_service(calls("counted"), tools=tools_b, **config)
    first = [e.tool_result for e in await run_events(channel_to(a)) if e.HasField("tool_result")]
    second = [e.tool_result for e in await run_events(channel_to(b)) if e.HasField("tool_result")]
    assert [r.cache_hit for r in first + second] == [False, True]
    assert second[0].data == first[0].data
    assert (tools_a["counted"].calls, tools_b["counted"].calls) == (1, 0)  # type: ignore[attr-defined]
