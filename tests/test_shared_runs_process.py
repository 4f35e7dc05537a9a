"""Two real server processes (`python -m service`) on one Redis prefix: a run submitted to A is watched, got and
cancelled through B, as behind a load balancer that sends each call to another replica."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from backends import RedisNamespace

from agent.v1 import agent_pb2 as pb
from conftest import stub

WORDS = " ".join(f"word{i}" for i in range(200))


async def serve(tmp_path: Path, name: str, ns: RedisNamespace) -> tuple[Any, int]:
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump({"name": "long", "turns": [{"text": WORDS}]}))
    config = tmp_path / f"{name}.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": "127.0.0.1:0",
                "metrics_listen": "127.0.0.1:0",
                "shutdown_grace_s": 5,
                "model": {"scenario": str(scenario), "pacing": {"first_token_ms": 0, "token_interval_ms": 5}},
                "state": {"url": ns.url, "prefix": ns.prefix},
            }
        )
    )
    return await launch(config, tmp_path / name)


async def launch(config: Path, data_dir: Path) -> tuple[Any, int]:
    """`python -m service --config CONFIG` with its data in `data_dir`, offline; the process and its port."""
    env = {**os.environ, "AGENT_DATA_DIR": str(data_dir), "ANTHROPIC_API_KEY": ""}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "service", "--config", str(config), stderr=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, "the service exited before serving"
        record = json.loads(line)
        if record["msg"] == "serving":
            return proc, int(record["port"])


@pytest.fixture
async def two_processes(tmp_path: Path, redis_ns: RedisNamespace) -> AsyncIterator[tuple[int, int]]:
    procs: list[Any] = []
    ports = []
    for name in ("a", "b"):
        proc, port = await serve(tmp_path, name, redis_ns)
        procs.append(proc)
        ports.append(port)
    yield ports[0], ports[1]
    for proc in procs:
        proc.send_signal(signal.SIGTERM)
    for proc in procs:
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0


def covered(events: list[pb.AgentEvent]) -> list[int]:
    return [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)]


async def test_submit_on_one_process_watch_get_and_cancel_on_the_other(two_processes: tuple[int, int]) -> None:
    port_a, port_b = two_processes
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel_b,
    ):
        on_a, on_b = stub(channel_a), stub(channel_b)
        run_id = (await on_a.SubmitRun(pb.RunAgentRequest(message="go"))).run_id
        live = [e async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id))]
        assert live[-1].HasField("final_response") and live[-1].final_response.text == WORDS
        got_a = await on_a.GetRun(pb.GetRunRequest(run_id=run_id))
        assert covered(live) == list(range(1, got_a.last_seq + 1))
        assert await on_b.GetRun(pb.GetRunRequest(run_id=run_id)) == got_a
        from_a = [e.SerializeToString() async for e in on_a.WatchRun(pb.WatchRunRequest(run_id=run_id))]
        from_b = [e.SerializeToString() async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id))]
        assert from_b == from_a

        second = (await on_a.SubmitRun(pb.RunAgentRequest(message="again"))).run_id
        watch = on_b.WatchRun(pb.WatchRunRequest(run_id=second))
        async for event in watch:
            if event.HasField("text_delta"):
                break
        reply = await on_b.CancelRun(pb.CancelRunRequest(run_id=second))
        assert reply.state == pb.Run.CANCELLED
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            async for _ in watch:
                pass
        assert ended.value.code() == grpc.StatusCode.CANCELLED
        got = await on_a.GetRun(pb.GetRunRequest(run_id=second))
        assert got.state == pb.Run.CANCELLED and got.error.message == "cancelled by CancelRun"
