"""Redis going away under the fleet policies, and coming back: a redis-server of the test's own on a free port (never
the shared one), started, killed and started again. Calls go on with the process's own limiter and breaker, the
outage is logged and counted once, and the policies are shared again once a probe finds the server answering."""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import redis.asyncio as redis
from prometheus_client import REGISTRY

from service.config.stores import StateConfig
from service.policy.breaker import CircuitBreaker
from service.policy.cache import ResultCache
from service.policy.fleet import FleetCache, FleetLimiter
from service.policy.fleet_breaker import FleetBreaker
from service.policy.limiter import RateLimiter
from service.policy.shared import BreakerAnswer, Reachability, SharedPolicy, StateUnavailable
from service.state.redis_client import connect
from service.state.redis_limits import RedisPolicyState
from tools.policy import BreakerPolicy, CachePolicy, RateLimitPolicy

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class OwnRedis:
    port: int
    proc: asyncio.subprocess.Process | None = None
    _dead: list[asyncio.subprocess.Process] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        assert REDIS_SERVER is not None
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER,
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        conn = redis.Redis(port=self.port, socket_connect_timeout=1)
        try:
            for _ in range(500):  # until it listens (readiness, not timing: it is usually up in a few ms)
                try:
                    await conn.ping()
                    return
                except redis.ConnectionError:
                    await asyncio.sleep(0.02)
            raise AssertionError("the test's redis-server did not start")
        finally:
            await conn.aclose()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()
        self.proc = None


@pytest.fixture
async def own_redis() -> AsyncIterator[OwnRedis]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(free_port())
    await server.start()
    yield server
    if server.proc is not None:
        await server.kill()


def degraded_count() -> float:
    return REGISTRY.get_sample_value("agent_state_degraded_total", {"part": "limits"}) or 0.0


async def test_calls_go_on_with_local_policies_while_redis_is_down_and_share_again_after(
    own_redis: OwnRedis, caplog: pytest.LogCaptureFixture
) -> None:
    state = RedisPolicyState(connect(StateConfig(url=own_redis.url, timeout_s=1.0)), "t:")
    shared = SharedPolicy(state, Reachability("limits", state.ping, probe_interval_s=0.02), cache=True)
    lim = FleetLimiter("tool", RateLimiter(RateLimitPolicy(rate_per_s=0.001, burst=1, mode="reject")), shared)
    breaker = FleetBreaker(CircuitBreaker("tool", BreakerPolicy()), shared, trial_ttl_s=5)
    cache = FleetCache("tool", ResultCache(CachePolicy(ttl_s=60)), shared)
    try:
        assert await lim.acquire() == 0.0
        assert await lim.acquire() is None  # the shared bucket is empty
        permit = await breaker.allow()
        assert permit is not None and permit.shared

        before = degraded_count()
        await own_redis.kill()
        caplog.clear()
        assert await lim.acquire() == 0.0  # the process's own bucket, full
        assert await lim.acquire() is None  # and it limits too
        local = await breaker.allow()
        assert local is not None and not local.shared
        await breaker.failure(permit)  # admitted by the fleet, its verdict is lost with the store: no error either
        await breaker.success(local)
        await cache.put("k", [1])
        assert await cache.get("k") == (True, [1])  # the local cache stands in
        assert shared.reach.degraded
        assert degraded_count() == before + 1  # one outage, however many calls met it
        assert REGISTRY.get_sample_value("agent_state_unreachable", {"part": "limits"}) == 1
        lines = [r for r in caplog.records if r.name == "service.policy.shared" and r.levelno == logging.WARNING]
        assert len(lines) == 1 and "unreachable" in lines[0].getMessage()

        await own_redis.start()
        await asyncio.wait_for(shared.reach.wait_recovered(), 30)
        assert not shared.reach.degraded
        assert REGISTRY.get_sample_value("agent_state_unreachable", {"part": "limits"}) == 0
        assert await lim.acquire() == 0.0  # the new server's bucket: nothing taken from it yet
        assert await lim.acquire() is None
        again = await breaker.allow()
        assert again is not None and again.shared
        await breaker.success(again)
        assert await cache.get("k") == (False, None)  # shared again: the new server never saw it
    finally:
        await shared.aclose()


class Unanswering:
    """A shared state whose breaker requests fail once `timeout` is set: a store that stopped answering."""

    def __init__(self) -> None:
        self.asked: list[list[str]] = []
        self.timeout = asyncio.Event()

    async def breaker(self, *_: Any) -> list[BreakerAnswer]:
        self.asked.append([request.kind for request in _[-1]])
        await self.timeout.wait()
        raise StateUnavailable("Timeout reading from 127.0.0.1:6379")

    async def ping(self) -> None:
        raise StateUnavailable("Connection refused")

    async def aclose(self) -> None:
        pass


async def test_allows_queued_behind_a_request_that_timed_out_go_on_locally_without_waiting_again() -> None:
    state = Unanswering()
    never = asyncio.Event()
    shared = SharedPolicy(state, Reachability("limits", state.ping, sleep=lambda _: never.wait()))  # type: ignore[arg-type]
    breaker = FleetBreaker(CircuitBreaker("tool", BreakerPolicy()), shared, trial_ttl_s=5)
    try:
        first = asyncio.ensure_future(breaker.allow())
        await asyncio.sleep(0)  # its request goes out
        later = [asyncio.ensure_future(breaker.allow()) for _ in range(3)]
        await asyncio.sleep(0)  # theirs wait for the next round trip
        state.timeout.set()
        permits = await asyncio.gather(first, *later)
        assert all(p is not None and not p.shared for p in permits)  # the process's own breaker admitted them
        assert state.asked == [["allow"]]  # no second round trip to a store that just timed out
        assert shared.reach.degraded
    finally:
        await shared.aclose()
