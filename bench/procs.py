"""Processes under test: start each system (the service, the bare gRPC server, the SSE endpoints) in its own
process, wait until it is ready, read its CPU time and memory with psutil, and stop it with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
from grpc_health.v1 import health_pb2, health_pb2_grpc

from bench.workload import Workload, write_service_config

ROOT = Path(__file__).resolve().parent.parent
# the A2A SDK baseline runs from its own venv (`make a2a-venv`): the SDK pins its own grpc and protobuf
A2A_PYTHON = ROOT / ".a2a-venv" / "bin" / "python"
SYSTEMS = ("service", "bare", "sse-async", "sse-sync")
SSE_FACE = "service-sse"  # `port` is its HTTP port
NAIVE = "sse-sync"  # serialises its streams: at C > 1 its runs are cut at a short deadline
UNPACED = ("service", "service-raw", "bare")
# Service variants: the `runs:` config each one runs with. Coalescing off makes the service send one message per
# text delta, as the baselines do, for a like-for-like unpaced comparison.
SERVICE_RUNS: dict[str, dict[str, Any]] = {
    "service": {},
    "service-sse": {},  # the same service, driven through its HTTP face (`bench.sse_face`)
    "service-raw": {"coalesce_window_s": 0, "subscriber_coalesce_lag": 1_000_000},
}
LABELS = {
    "service": "agent service",
    "service-raw": "agent service, coalescing off",
    "service-sse": "agent service, SSE face",
    "bare": "bare grpc.aio (limit)",
    "bare-stock": "bare grpc.aio, grpc's own accept",
    "sse-async": "FastAPI SSE, async gen",
    "sse-sync": "FastAPI SSE, sync gen (naive)",
    "a2a": "A2A SDK gRPC server",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def child_env(root: Path = ROOT) -> dict[str, str]:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR", PYTHONUNBUFFERED="1")
    env.pop("ANTHROPIC_API_KEY", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    return env


@dataclass
class Server:
    """One system under test, running in its own process."""

    system: str
    proc: subprocess.Popen[bytes]
    port: int
    log_path: Path
    health_port: int | None = None  # a supervisor of workers says it serves here once every worker does
    metrics_port: int | None = None  # the service's /metrics (with workers, the supervisor's, for all of them)
    ps: psutil.Process = field(init=False)

    def __post_init__(self) -> None:
        self.ps = psutil.Process(self.proc.pid)

    @property
    def target(self) -> str:
        if self.system == SSE_FACE:
            return f"http://127.0.0.1:{self.port}/v1/runs:stream"
        if self.system.startswith("sse"):
            return f"http://127.0.0.1:{self.port}/run"
        return f"127.0.0.1:{self.port}"

    @property
    def proto(self) -> str:
        return "sse" if self.system.startswith("sse") or self.system == SSE_FACE else "grpc"

    def cpu_s(self) -> float:
        """The process's CPU time and its live children's: with `--workers` the supervisor serves nothing and its
        workers do it all. A child that exits between two readings drops out of the sum, so read it over spans in
        which the workers live throughout (a worker restart shows in its log)."""
        total = 0.0
        for ps in (self.ps, *self.ps.children(recursive=True)):
            with contextlib.suppress(psutil.NoSuchProcess):
                t = ps.cpu_times()
                total += t.user + t.system
        return total

    def thread_cpu_s(self) -> float:
        """CPU time of the process's live threads, to the nanosecond where Linux has `schedstat` (psutil's figure
        moves in 10 ms clock ticks, too coarse for a burst of a hundred calls). Threads that have exited are not
        counted: use it over spans in which the server starts and stops none (its grpc and helper threads live as
        long as it does)."""
        tasks = Path(f"/proc/{self.proc.pid}/task")
        if not tasks.is_dir():
            return self.cpu_s()
        total = 0
        for task in tasks.iterdir():
            with contextlib.suppress(OSError):  # a thread that ended while we read
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9

    def rss(self) -> int:
        return int(self.ps.memory_info().rss)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def python_under(folder: Path, name: str, command: str) -> str:
    """A stand-in for the python that `start` runs (`python=`): a script in `folder` that runs `command` with the
    server's arguments (`-m …`) after it, e.g. the interpreter under callgrind or cProfile."""
    script = folder / name
    script.write_text(f'#!/bin/sh\nexec {command} "$@"\n')
    script.chmod(0o755)
    return str(script)


def start(
    system: str,
    workload: Workload,
    workdir: Path,
    timeout: float = 30.0,
    *,
    start_cpu_us: float = 0,
    root: Path = ROOT,
    python: str = sys.executable,
    config: dict[str, Any] | None = None,
) -> Server:
    """`start_cpu_us`: the bare server spends this much CPU at each call's start (`bench.bare_grpc`). `root` and
    `python`: the checkout and interpreter the system runs from (`bench.versus` starts another checkout's service
    with that checkout's own venv). `config`: top-level sections of the service's config (e.g. `state`,
    `workers`, as `bench.replicas` compares them); with `workers` above 1 the server is ready once the supervisor's
    health port says every worker serves."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    spec = json.dumps(workload.as_dict())
    health_port = metrics_port = None
    http_port = free_port() if system == SSE_FACE else 0  # the server's `port` then: the face under test
    if system in SERVICE_RUNS:
        extra = dict(config or {})
        if extra.get("workers", 1) > 1:
            health_port = free_port()
            extra["health_listen"] = f"127.0.0.1:{health_port}"
        metrics_port = free_port()
        if http_port:
            extra["http_listen"] = f"127.0.0.1:{http_port}"
        config_path = write_service_config(workload, workdir / system, port, metrics_port, SERVICE_RUNS[system], extra)
        cmd = ["-m", "service", "--config", str(config_path), "--log-level", "WARNING"]
    elif system == "a2a":
        python = str(A2A_PYTHON)
        cmd = ["-m", "bench.a2a_baseline", "serve", "--port", str(port), "--workload", spec]
    elif system in ("bare", "bare-stock"):
        cmd = ["-m", "bench.bare_grpc", "--port", str(port), "--workload", spec, "--start-cpu-us", str(start_cpu_us)]
        if system == "bare-stock":  # grpc.aio taking up one new call per method at a time (service/rpc/accept.py)
            cmd += ["--accept-ahead", "0"]
    else:
        mode = system.removeprefix("sse-")
        cmd = ["-m", "bench.sse_server", "--port", str(port), "--mode", mode, "--workload", spec]
    log_path = workdir / f"{system}-{workload.kind}{f'-{start_cpu_us:g}us' if start_cpu_us else ''}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen([python, *cmd], cwd=root, env=child_env(root), stdout=subprocess.DEVNULL, stderr=log)
    server = Server(system, proc, http_port or port, log_path, health_port, metrics_port)
    try:
        wait_ready(server, timeout)
    except BaseException:
        server.stop()
        raise
    return server


def wait_ready(server: Server, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"{server.system} exited: {server.log_path.read_text()[-2000:]}")
        if _ready(server):
            return
        time.sleep(0.1)
    raise TimeoutError(f"{server.system} not ready after {timeout} s")


def _ready(server: Server) -> bool:
    if server.proto == "sse":
        path = "/v1/tools" if server.system == SSE_FACE else "/health"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.port}{path}", timeout=1) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False
    if server.health_port is None:
        return asyncio.run(_grpc_serving(server.target))
    # the supervisor's health says "" serves from its start, and the service's name once every worker serves
    return asyncio.run(_grpc_serving(f"127.0.0.1:{server.health_port}", "agent.v1.AgentService"))


async def _grpc_serving(target: str, service: str = "") -> bool:
    request = health_pb2.HealthCheckRequest(service=service)
    async with grpc.aio.insecure_channel(target) as channel:
        try:
            reply = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=1)
        except grpc.aio.AioRpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


class RssSampler:
    """Samples a process's RSS every `interval` seconds in a thread; `peak` is the largest seen."""

    def __init__(self, server: Server, interval: float = 0.05) -> None:
        self.server = server
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.peak = max(self.peak, self.server.rss())
            self._stop.wait(self.interval)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
