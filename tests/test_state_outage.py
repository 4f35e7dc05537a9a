"""Redis lost mid-run, with a Redis of the test's own (the shared one is left alone): the run goes on and finishes,
health says the state store is down (the service itself stays SERVING), new runs are refused with UNAVAILABLE, and
once Redis is back (restarted empty, the harder case) every event reaches it and new runs start again."""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import RedisNamespace
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from test_shared_runs import GATED, covered, read_until, replicas

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.rpc.server import SERVICE_NAME
from service.run import RunState
from service.wiring import STATE_HEALTH


class OwnRedis:
    def __init__(self, tmp_path: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.dir = tmp_path
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            "redis-server",
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"),
            *("--dir", str(self.dir)),
            stdout=asyncio.subprocess.DEVNULL,
        )
        await eventually(self._answers)

    def _answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    async def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


async def eventually(condition: Callable[[], Any], within_s: float = 20.0) -> None:
    """Wait for `condition` (a bounded wait on something the test cannot be told of, such as another process)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within_s
    while not condition():
        assert loop.time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.02)


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("no redis-server to start")
    server = OwnRedis(tmp_path)
    await server.start()
    yield server
    await server.kill()


async def status(channel: grpc.aio.Channel, service: str) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(reply.status)


async def test_redis_stopped_mid_run(start_service: Any, channel_to: Any, tmp_path: Path, own_redis: OwnRedis) -> None:
    ns = RedisNamespace(own_redis.url, "outage:")
    (a, b), opened = await replicas(start_service, tmp_path, ns, GATED)
    channel_a = channel_to(a)
    on_a, on_b = stub(channel_a), stub(channel_to(b))
    assert await status(channel_a, STATE_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    seen: list[pb.AgentEvent] = []
    call = on_a.RunAgent(pb.RunAgentRequest(message="go"))
    await read_until(call, "tool_call_ready", seen)
    run_id = seen[0].run_id
    await own_redis.kill()
    opened.set()
    seen += [e async for e in call]  # the run finishes on A, its stream never waits on Redis
    run = a.registry.get(run_id)
    assert run.state is RunState.SUCCEEDED and covered(seen) == list(range(1, len(run.log) + 1))

    store = a.registry.store
    assert store is not None
    await eventually(lambda: not store.up)
    assert await status(channel_a, STATE_HEALTH) == health_pb2.HealthCheckResponse.NOT_SERVING
    assert await status(channel_a, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert REGISTRY.get_sample_value("agent_state_store_up") == 0
    # the store may be marked down by another of its connections first: the shipper's failure comes in its turn
    await eventually(lambda: (REGISTRY.get_sample_value("agent_state_unshipped_events") or 0) > 0)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await on_a.SubmitRun(pb.RunAgentRequest(message="new"))
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "retry in" in (refused.value.details() or "")

    await own_redis.start()  # empty: it kept nothing on disk
    await eventually(lambda: store.up)
    assert await store.shipper.flushed(10)
    assert await status(channel_a, STATE_HEALTH) == health_pb2.HealthCheckResponse.SERVING
    replay = [e async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30)]
    assert covered(replay) == list(range(1, len(run.log) + 1)) and replay[-1] == seen[-1]
    assert (await on_b.GetRun(pb.GetRunRequest(run_id=run_id))).state == pb.Run.SUCCEEDED
    submitted = await on_b.SubmitRun(pb.RunAgentRequest(message="after"))
    assert (await on_a.GetRun(pb.GetRunRequest(run_id=submitted.run_id))).run_id == submitted.run_id
