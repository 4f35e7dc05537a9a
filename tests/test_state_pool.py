"""The shared state's Redis client under a burst: past its connection cap a command waits for a free connection
rather than failing (a failure there read as Redis unreachable, and runs were refused UNAVAILABLE)."""

from __future__ import annotations

import asyncio

from backends import RedisNamespace

from service.config import StateConfig
from service.state.redis_client import connect


async def test_a_burst_past_the_connection_cap_waits_instead_of_failing(redis_ns: RedisNamespace) -> None:
    client = connect(StateConfig(url=redis_ns.url, prefix=redis_ns.prefix, max_connections=2, timeout_s=5))
    key = f"{redis_ns.prefix}burst"
    try:
        # BLPOP with a short timeout holds its connection for that long: 20 at once need 20 connections at once
        results = await asyncio.gather(*(client.blpop([key], timeout=0.05) for _ in range(20)))
        assert results == [None] * 20
    finally:
        await client.aclose()
