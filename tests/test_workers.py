"""`python -m service --workers N`: a supervisor and N real server processes on one port, with the real Redis as the
shared state the config requires. Which worker served what is read from the workers' own log lines (each carries
its `worker` index), never from an API made for the test."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import sys
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import PostgresSchema, RedisNamespace
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.config import Config
from service.rpc.server import server_options
from service.rpc.workers import reserve_port

CONNECTIONS = 20
"""Connections opened at once: the kernel spreads them over the workers by a hash of their addresses, so all 20 land
on one of two workers once in 2^19 tries."""

GATE_TOOL = """
import asyncio
import os

from pydantic import BaseModel

from tools.base import Tool


class In(BaseModel):
    pass


class Gate(Tool[In]):
    name = "gate"
    description = "Waits until the test opens the gate."
    Input = In

    async def run(self, args):
        while not os.path.exists(os.environ["GATE_FILE"]):
            await asyncio.sleep(0.02)
        return {"gate": "open"}


def create(config):
    return Gate()
"""


class Log:
    """The JSON lines a process (and its workers, which share its stderr) writes, read as they come so that the pipe
    never fills. Ends when every process holding the pipe has exited."""

    def __init__(self, stream: asyncio.StreamReader) -> None:
        self.records: list[dict[str, Any]] = []
        self.text: list[str] = []
        self.closed = False
        self._more = asyncio.Condition()
        self._task = asyncio.create_task(self._read(stream))

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            text = line.decode(errors="replace")
            self.text.append(text)
            with contextlib.suppress(ValueError):
                self.records.append(json.loads(text))
            async with self._more:
                self._more.notify_all()
        self.closed = True
        async with self._more:
            self._more.notify_all()

    async def wait_for(self, match: Callable[[dict[str, Any]], bool], *, after: int = 0) -> dict[str, Any]:
        """The first record from index `after` on that `match`es, waiting for it to be written."""

        async def find() -> dict[str, Any]:
            seen = after
            async with self._more:
                while True:
                    for record in self.records[seen:]:
                        if match(record):
                            return record
                    seen = len(self.records)
                    assert not self.closed, f"no such line before the end:\n{''.join(self.text)}"
                    await self._more.wait()

        return await asyncio.wait_for(find(), 60)

    async def end(self) -> None:
        await asyncio.wait_for(self._task, 60)


def _config(tmp_path: Path, redis_ns: RedisNamespace | None, extra: str = "") -> Path:
    state = f"state: {{url: '{redis_ns.url}', prefix: '{redis_ns.prefix}'}}\n" if redis_ns else ""
    path = tmp_path / "config.yaml"
    path.write_text(
        "listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\nhealth_listen: 127.0.0.1:0\nshutdown_grace_s: 10\n"
        "model:\n  pacing: {first_token_ms: 0, token_interval_ms: 0}\n" + state + extra
    )
    return path


@contextlib.asynccontextmanager
async def _supervisor(
    tmp_path: Path, config: Path, *args: str, env: dict[str, str] | None = None
) -> AsyncIterator[tuple[Any, Log]]:
    """`python -m service --config CONFIG ARGS…` and its log. At the end the supervisor is killed if it still runs,
    and so is every worker it started that outlived it (a test that failed), before the log is read to its end."""
    proc = await _spawn(tmp_path, config, *args, env=env)
    assert proc.stderr is not None
    log = Log(proc.stderr)
    try:
        yield proc, log
    finally:
        if proc.returncode is None:
            proc.kill()
        for record in log.records:
            if record.get("msg") == "worker started" and _worker_of(proc.pid, record["pid"]):
                os.kill(record["pid"], signal.SIGKILL)
        await proc.wait()  # asyncio waits for its stderr to close too: for every worker's end
        await log.end()


def _worker_of(supervisor: int, pid: int) -> bool:
    """Whether `pid` is still a worker of `supervisor` (and not a process that reuses the pid of one)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"--supervisor\0{supervisor}\0".encode() in f.read()
    except OSError:
        return False


async def _spawn(tmp_path: Path, config: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    """The service with its data and temporary files (the supervisor's metrics folder) under `tmp_path`."""
    (tmp_path / "tmp").mkdir(exist_ok=True)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service", "--config", str(config), *args),
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "AGENT_DATA_DIR": str(tmp_path / "var"),
            "TMPDIR": str(tmp_path / "tmp"),
            "ANTHROPIC_API_KEY": "",
            **(env or {}),
        },
    )


def _supervisor_serving(record: dict[str, Any]) -> bool:
    return record.get("msg") == "serving" and "worker" not in record


def _alive(pid: int) -> bool:
    """Running, not a zombie (a zombie re-parented to this test process stays one until it is reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _ended(pidfds: list[int]) -> None:
    """Wait until the processes of `pidfds` have ended (a pidfd turns readable then), and close them."""
    try:
        pending = set(pidfds)
        while pending:
            ready, _, _ = await asyncio.to_thread(select.select, list(pending), [], [], 60)
            assert ready, "still running a minute after their supervisor died"
            pending -= set(ready)
    finally:
        for fd in pidfds:
            os.close(fd)


async def _metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    url = f"http://127.0.0.1:{port}/metrics"
    text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _channels(port: int) -> list[grpc.aio.Channel]:
    """Channels on connections of their own (grpc shares one between channels to the same target otherwise)."""
    options = [("grpc.use_local_subchannel_pool", 1)]
    return [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) for _ in range(CONNECTIONS)]


async def _health(port: int) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return int((await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())).status)


async def test_two_workers_share_the_port_and_metrics_and_a_dead_one_is_restarted(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    channels: list[grpc.aio.Channel] = []
    async with _supervisor(tmp_path, _config(tmp_path, redis_ns), "--workers", "2") as (proc, log):
        serving = await log.wait_for(_supervisor_serving)
        pids, port = serving["pids"], serving["port"]
        assert len(pids) == 2 and serving["workers"] == 2 and port != 0
        assert await _health(port) == health_pb2.HealthCheckResponse.SERVING  # a worker's
        assert await _health(serving["health_port"]) == health_pb2.HealthCheckResponse.SERVING  # the supervisor's
        try:
            channels = _channels(port)
            runs = await asyncio.gather(*(_run(channel) for channel in channels))
            assert all(events[-1].HasField("final_response") for events in runs)
            ended = [await log.wait_for(_run_ended(events[0].run_id)) for events in runs]
            by_worker = {w: sum(1 for r in ended if r["worker"] == w) for w in (0, 1)}
            assert by_worker[0] > 0 and by_worker[1] > 0, by_worker  # both served
            metrics = await _metrics(serving["metrics_port"])
            assert metrics["agent_runs_total", (("outcome", "OK"),)] == CONNECTIONS  # both workers' counts, summed
            busy = {labels for name, labels in metrics if name == "agent_event_loop_busy_ratio"}
            assert busy == {(("pid", str(pid)),) for pid in pids}  # one per worker

            os.kill(pids[1], signal.SIGKILL)
            died = await log.wait_for(lambda r: r.get("msg") == "worker died: restarting it")
            assert (died["worker"], died["pid"], died["signal"]) == (1, pids[1], "SIGKILL")
            after = log.records.index(died)
            restarted = await log.wait_for(lambda r: r.get("msg") == "serving" and r.get("worker") == 1, after=after)
            assert restarted["port"] == port  # the supervisor held it
            metrics = await _metrics(serving["metrics_port"])
            assert metrics["agent_worker_restarts_total", ()] == 1
            assert metrics["agent_runs_total", (("outcome", "OK"),)] == CONNECTIONS  # the dead worker's count stays
            runs = await asyncio.gather(*(_run(channel) for channel in channels))
            assert all(events[-1].HasField("final_response") for events in runs)
        finally:
            for channel in channels:
                await channel.close()

        metrics_dir = Path(serving["metrics_dir"])
        assert metrics_dir.parent == tmp_path / "tmp" and os.listdir(metrics_dir)  # the workers' files
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 60) == 0  # asyncio's wait is also for every worker's stderr
        assert not [pid for pid in pids if _alive(pid)]
        assert metrics_dir.name not in os.listdir(metrics_dir.parent)  # the supervisor removed it


def _run_ended(run_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda record: record.get("msg") == "run ended" and record.get("run_id") == run_id


async def _run(channel: grpc.aio.Channel, message: str = "hello") -> list[pb.AgentEvent]:
    return [e async for e in stub(channel).RunAgent(pb.RunAgentRequest(message=message))]


async def test_sigterm_drains_the_runs_in_flight_on_every_worker(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    (tmp_path / "gate_tool.py").write_text(GATE_TOOL)
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text("name: gate\nturns:\n  - tool_calls: [{name: gate, input: {}}]\n  - text: done\n")
    gate = tmp_path / "open"
    config = _config(tmp_path, redis_ns, "tool_modules: [gate_tool]\n")
    config.write_text(config.read_text().replace("model:\n", f"model:\n  scenario: {scenario}\n"))
    env = {"PYTHONPATH": str(tmp_path), "GATE_FILE": str(gate)}
    channels: list[grpc.aio.Channel] = []
    async with _supervisor(tmp_path, config, "--workers", "2", env=env) as (proc, log):
        try:
            serving = await log.wait_for(_supervisor_serving)
            channels = _channels(serving["port"])
            calls = [stub(channel).RunAgent(pb.RunAgentRequest(message="go")) for channel in channels]
            for call in calls:  # every run is in its tool call, held at the gate
                async for event in call:
                    if event.HasField("tool_call_ready"):
                        break
            metrics = await _metrics(serving["metrics_port"])
            assert metrics["agent_active_runs", ()] == CONNECTIONS  # both workers' runs, summed

            proc.send_signal(signal.SIGTERM)
            draining = [
                await log.wait_for(lambda r, w=w: r.get("msg") == "draining" and r.get("worker") == w) for w in (0, 1)
            ]
            assert all(d["active_streams"] > 0 for d in draining), draining  # runs in flight on both
            assert sum(d["active_streams"] for d in draining) == CONNECTIONS
            assert proc.returncode is None  # the supervisor waits for its draining workers
            gate.touch()
            rest = [[e async for e in call] for call in calls]
            assert all(events[-1].final_response.text == "done" for events in rest)
        finally:
            gate.touch()
            for channel in channels:
                await channel.close()
        assert await asyncio.wait_for(proc.wait(), 60) == 0
        assert not [pid for pid in serving["pids"] if _alive(pid)]


async def test_killing_the_supervisor_stops_its_workers(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    async with _supervisor(tmp_path, _config(tmp_path, redis_ns), "--workers", "2") as (proc, log):
        serving = await log.wait_for(_supervisor_serving)
        workers = [os.pidfd_open(pid) for pid in serving["pids"]]  # not this process's children: no waitpid
        proc.kill()
        await _ended(workers)
        assert {r.get("worker") for r in log.records if r.get("msg") == "draining"} == {0, 1}  # they drained


async def test_a_worker_that_cannot_start_fails_the_start(tmp_path: Path, redis_ns: RedisNamespace) -> None:
    config = _config(tmp_path, redis_ns, "tool_modules: [no_such_tool_module]\n")
    async with _supervisor(tmp_path, config, "--workers", "2") as (proc, log):
        assert await asyncio.wait_for(proc.wait(), 60) == 1
        failed = await log.wait_for(lambda r: r.get("msg") == "worker exited before serving")
        assert failed["exit_code"] == 1
    text = "".join(log.text)
    assert "error: cannot start: No module named 'no_such_tool_module'" in text and "Traceback" not in text
    assert not any(_supervisor_serving(r) for r in log.records)


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["--workers", "2"], {}, "state.url memory://"),
        ([], {"AGENT_WORKERS": "3"}, "workers: 3 needs a shared state.url"),
        (
            ["--workers", "2", "--listen", "unix:/tmp/agent.sock"],
            {"AGENT_STATE_URL": "redis://127.0.0.1:6379/0"},
            "TCP",
        ),
    ],
)
async def test_workers_without_shared_state_refuse_to_start(
    tmp_path: Path, args: list[str], env: dict[str, str], expected: str
) -> None:
    proc = await _spawn(tmp_path, _config(tmp_path, None), *args, env=env)
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 2, err.decode()
    assert expected in err.decode() and "Traceback" not in err.decode()


async def test_records_on_postgresql_without_a_given_key_are_refused_once_before_any_worker_starts(
    tmp_path: Path, redis_ns: RedisNamespace, postgres_schema: PostgresSchema
) -> None:
    """Every worker would refuse the config alike: the supervisor says so once, as one process would, and exits."""
    config = _config(tmp_path, redis_ns, f"records: {{url: '{postgres_schema.url}'}}\n")
    proc = await _spawn(tmp_path, config, "--workers", "2", env={"AGENT_AUDIT_KEY": ""})  # empty: no key
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    text = err.decode()
    assert proc.returncode == 1, text
    message = "its key must be given too: set audit.key_file (a mounted Secret) or AGENT_AUDIT_KEY"
    assert text.count(message) == 1, text  # was once per worker
    assert "error: cannot start: records.url is PostgreSQL" in text and "Traceback" not in text
    assert '"worker started"' not in text  # refused before any worker ran
    assert not (tmp_path / "var" / "audit.key").exists()


def test_the_reserved_port_is_shared_by_reuseport_sockets_only() -> None:
    placeholder, listen = reserve_port("127.0.0.1:0")
    with placeholder:
        port = int(listen.rpartition(":")[2])
        assert listen == f"127.0.0.1:{port}" and port != 0
        shared = socket.socket()
        shared.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        with shared:
            shared.bind(("127.0.0.1", port))  # as a worker's grpc does
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", port))
    with socket.socket() as taken:  # another program's port
        taken.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot listen on {address}"):
            reserve_port(address)


def test_only_workers_share_their_port() -> None:
    """One process keeps refusing a port in use (tests/test_process.py); workers must share theirs."""
    assert ("grpc.so_reuseport", 0) in server_options(Config())
    assert ("grpc.so_reuseport", 1) in server_options(Config.model_validate({"workers": 2}))
