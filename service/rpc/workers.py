"""`--workers N`: a supervisor process and N server processes (workers) sharing the gRPC port with SO_REUSEPORT, so
that one machine's cores all serve. `workers: 1` (the default) runs none of this: the one process serves itself.

The supervisor serves no RPC. It
- refuses once, before any worker starts, a config every worker would refuse alike (records on PostgreSQL with no
  audit key given);
- reserves the port: a socket bound with SO_REUSEPORT to `listen` and never listened on, held for its lifetime. On
  port 0 the kernel picks the port there, and every worker binds that one; a worker restarted later finds it still
  ours; a port held by another program fails here, before any worker starts;
- starts the workers, fresh interpreters (`python -m service --worker I`, never a fork of a process with grpc's
  threads) given the resolved config on stdin, a private metrics folder in `PROMETHEUS_MULTIPROC_DIR`, and a pipe
  on which each says when it serves;
- serves `/metrics` (the workers' files aggregated, plus its own counters) and `health_listen` once for the machine;
- restarts a worker that dies (logged, counted in `agent_worker_restarts_total`): the others' runs go on, which
  exiting the pod would end. Workers that keep dying (`MAX_RESTARTS` within `RESTART_WINDOW_S`, e.g. a store that
  refuses them) are a fault a restart here will not mend: it then stops the rest and exits 1, and Kubernetes
  restarts the pod with its back-off;
- on SIGTERM or SIGINT sends SIGTERM to every worker, each drains as a single process does (`shutdown_grace_s`), and
  exits 0 once all of them have; one still running `STOP_MARGIN_S` after the grace is killed.

Each worker asks the kernel for SIGTERM when the supervisor dies (PR_SET_PDEATHSIG): if the supervisor is killed, its
workers drain and exit rather than serve on unsupervised.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, Counter, start_http_server
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from service import hardening
from service.config import Config
from service.records.audit_chain import AuditKeyError, require_given_key
from service.rpc.server import SERVICE_NAME, HealthServicer, Service, StartupError, listen_on, serve
from service.telemetry import setup_logging
from tools._children import track, untrack

log = logging.getLogger(__name__)

MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0
STOP_MARGIN_S = 10.0
"""Beyond `shutdown_grace_s`, what a draining worker may take: flushing its streams (up to 2 s), stopping the server
(1 s), closing its stores. k8s/deployment.yaml's termination grace period covers the grace and this."""

_PR_SET_PDEATHSIG = 1


class WorkersError(Exception):
    """The config cannot run as several workers (exit 2: a usage error, not a failure to start)."""


def check(config: Config) -> None:
    if not config.state.shared:
        raise WorkersError(
            f"workers: {config.workers} needs a shared state.url (redis://…, or AGENT_STATE_URL): with state.url "
            f"{config.state.url} each worker keeps its own runs, so GetRun, WatchRun and CancelRun reaching another "
            "worker would not find them. Set state.url, or run one worker"
        )
    if config.listen.startswith(("unix:", "unix-abstract:")):
        raise WorkersError(f"workers: {config.workers} needs a TCP listen address: {config.listen} cannot be shared")


def reserve_port(listen: str) -> tuple[socket.socket, str]:
    """A socket bound with SO_REUSEPORT to `listen` (not listening: the kernel hands connections only to listening
    sockets, the workers'), and `listen` with the port it got."""
    host, _, port = listen.rpartition(":")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host.strip("[]") or None, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {listen}: {exc.strerror}") from exc
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {listen}: {exc.strerror or exc}") from exc
    return sock, f"{host}:{sock.getsockname()[1]}"


@dataclass
class Worker:
    index: int
    process: asyncio.subprocess.Process
    serving: asyncio.Future[None]  # done when the worker says it serves
    exited: asyncio.Task[int]  # its exit code, or minus the signal that ended it


class Supervisor:
    """Runs the workers of `config` (see the module's docstring)."""

    def __init__(self, config: Config, *, log_level: str) -> None:
        self.config = config
        self.log_level = log_level
        self.workers: dict[int, Worker] = {}
        self.restarts: deque[float] = deque()
        self.registry = CollectorRegistry()
        self.restarts_total = Counter(
            "agent_worker_restarts_total", "Workers restarted after they died", registry=self.registry
        )
        self.stop = asyncio.Event()
        self.health = HealthServicer()
        self.folder = ""
        self.worker_config = ""

    async def run(self) -> int:
        """Serve until SIGTERM or SIGINT; the exit code. Raises StartupError when it cannot start."""
        hardening.make_undumpable()  # its environment holds the API key, as the workers' do
        reaper = hardening.reap_orphans()  # a dead worker's children come here
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop.set)
        self.folder = tempfile.mkdtemp(prefix="agent-metrics-")  # 0700, this user's
        placeholder, metrics, health = None, None, None
        try:
            try:
                placeholder, listen = reserve_port(self.config.listen)
                metrics, metrics_port = self._serve_metrics()
                health, health_port = await self._serve_health()
            except OSError as exc:
                raise StartupError(f"cannot start: {exc}") from exc
            self.worker_config = self.config.model_copy(
                update={"listen": listen, "health_listen": None}
            ).model_dump_json()
            code = await self._start_all()
            if code is None:
                for name in ("", SERVICE_NAME):
                    await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
                log.info(
                    "serving",
                    extra={
                        "workers": len(self.workers),
                        "pids": [w.process.pid for w in self.workers.values()],
                        "listen": self.config.listen,
                        "port": int(listen.rpartition(":")[2]),
                        "metrics_port": metrics_port,
                        "health_port": health_port,
                        "metrics_dir": self.folder,
                    },
                )
                code = await self._supervise()
            return max(code, await self._stop_all())
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if health is not None:
                await health.stop(0)
            if metrics is not None:
                await asyncio.to_thread(metrics.shutdown)
                metrics.server_close()
            if placeholder is not None:
                placeholder.close()
            shutil.rmtree(self.folder, ignore_errors=True)
            reaper.cancel()
            await asyncio.gather(reaper, return_exceptions=True)

    def _serve_metrics(self) -> tuple[Any, int]:
        MultiProcessCollector(self.registry, path=self.folder)  # type: ignore[no-untyped-call]
        host, _, port = self.config.metrics_listen.rpartition(":")
        try:
            server, _thread = start_http_server(int(port), host.strip("[]") or "0.0.0.0", registry=self.registry)
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {self.config.metrics_listen}: {exc.strerror or exc}") from exc
        return server, int(server.server_port)

    async def _serve_health(self) -> tuple[grpc.aio.Server | None, int | None]:
        if not self.config.health_listen:
            return None, None
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        port = listen_on(server, self.config.health_listen)
        await server.start()
        return server, port

    async def _spawn(self, index: int) -> Worker:
        """Start worker `index`: the config on its stdin, a pipe on which it says it serves."""
        read_end, write_end = os.pipe()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                *("-m", "service", "--log-level", self.log_level),
                *("--worker", str(index), "--status-fd", str(write_end), "--supervisor", str(os.getpid())),
                stdin=asyncio.subprocess.PIPE,
                pass_fds=(write_end,),
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.folder},
            )
        except BaseException:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
        track(process.pid)  # the orphan reaper leaves it to asyncio's child watcher
        log.info("worker started", extra={"worker": index, "pid": process.pid})
        assert process.stdin is not None
        process.stdin.write(self.worker_config.encode())
        with contextlib.suppress(ConnectionError):  # it died at once: its exit says why
            await process.stdin.drain()
        process.stdin.close()
        serving = asyncio.get_running_loop().create_future()
        status = asyncio.create_task(_read_status(read_end, serving), name=f"worker-{index}-status")
        exited = asyncio.create_task(self._wait(process, status), name=f"worker-{index}")
        return Worker(index, process, serving, exited)

    async def _wait(self, process: asyncio.subprocess.Process, status: asyncio.Task[None]) -> int:
        code = await process.wait()
        untrack(process.pid)
        # its live gauges (active runs…) no longer count; its counters and histograms still do
        mark_process_dead(process.pid, self.folder)  # type: ignore[no-untyped-call]
        await status  # the pipe's end: the worker's was closed when it exited
        return code

    async def _start_all(self) -> int | None:
        """Start every worker and wait until all serve: None, or the exit code when one ends first or SIGTERM came."""
        for index in range(self.config.workers):
            self.workers[index] = await self._spawn(index)
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while not all(w.serving.done() for w in self.workers.values()):
                exits = {w.exited: w for w in self.workers.values()}
                waits: list[asyncio.Future[Any]] = [stopping, *exits, *(w.serving for w in self.workers.values())]
                await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
                if self.stop.is_set():
                    return 0
                for task, worker in exits.items():
                    if task.done():
                        log.error("worker exited before serving", extra=_ended(worker))
                        return 1
            return None
        finally:
            stopping.cancel()

    async def _supervise(self) -> int:
        """Restart the workers that die until SIGTERM (0), or until they keep dying (1)."""
        stopping = asyncio.create_task(self.stop.wait())
        try:
            while True:
                exits = {w.exited: w for w in self.workers.values()}
                done, _ = await asyncio.wait([stopping, *exits], return_when=asyncio.FIRST_COMPLETED)
                if self.stop.is_set():
                    return 0
                for task in done:
                    worker = exits[task]
                    now = time.monotonic()
                    self.restarts.append(now)
                    while self.restarts[0] < now - RESTART_WINDOW_S:
                        self.restarts.popleft()
                    if len(self.restarts) > MAX_RESTARTS:
                        log.error(
                            "workers keep dying: stopping the rest and exiting",
                            extra={**_ended(worker), "restarts": len(self.restarts) - 1, "within_s": RESTART_WINDOW_S},
                        )
                        return 1
                    log.warning("worker died: restarting it", extra=_ended(worker))
                    self.restarts_total.inc()
                    self.workers[worker.index] = await self._spawn(worker.index)
        finally:
            stopping.cancel()

    async def _stop_all(self) -> int:
        """SIGTERM to every worker, each drains; 0 when all ended well."""
        await self.health.enter_graceful_shutdown()
        running = [w for w in self.workers.values() if not w.exited.done()]
        log.info("stopping workers", extra={"workers": len(running), "grace_s": self.config.shutdown_grace_s})
        for worker in running:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        exits = [w.exited for w in running]
        if exits:
            _, late = await asyncio.wait(exits, timeout=self.config.shutdown_grace_s + STOP_MARGIN_S)
            for worker in running:
                if worker.exited in late:
                    log.warning("worker still running after its drain: killing it", extra={"worker": worker.index})
                    with contextlib.suppress(ProcessLookupError):
                        worker.process.kill()
            await asyncio.wait(exits)
        # a worker still starting when SIGTERM came ends by it, before it could drain: nothing to drain then
        return 0 if all(w.exited.result() in (0, -signal.SIGTERM) for w in running) else 1


async def _read_status(fd: int, serving: asyncio.Future[None]) -> None:
    """Read the worker's status pipe to its end, marking `serving` when it says so."""
    reader = asyncio.StreamReader()
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb", 0))
    try:
        while line := await reader.readline():
            if line == b"serving\n" and not serving.done():
                serving.set_result(None)
    finally:
        transport.close()


def _ended(worker: Worker) -> dict[str, Any]:
    code = worker.exited.result()
    how = {"exit_code": code} if code >= 0 else {"signal": signal.Signals(-code).name}
    return {"worker": worker.index, "pid": worker.process.pid, **how}


def supervise(config: Config, *, log_level: str) -> int:
    """`python -m service` with `workers` above 1: the exit code (2 for a config that cannot run as workers)."""
    try:
        check(config)
    except WorkersError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        # what would stop every worker alike is said once, here, as a single process says it
        require_given_key(config.records.url, config.audit.key_file)
    except AuditKeyError as exc:
        print(f"error: cannot start: {exc}", file=sys.stderr)
        return 1
    try:
        return asyncio.run(Supervisor(config, log_level=log_level).run())
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def work(
    index: int,
    *,
    status_fd: int,
    supervisor: int,
    log_level: str,
    start: Callable[..., Awaitable[Service]],
) -> int:
    """`python -m service --worker INDEX …`, as the supervisor starts it: serve the config read from stdin on the
    shared port (no metrics or health port of its own), say so on `status_fd`, drain on SIGTERM."""
    if not _die_with(supervisor):
        return 1
    setup_logging(log_level, {"worker": index})
    config = Config.model_validate_json(sys.stdin.buffer.read())
    status = os.fdopen(status_fd, "wb", buffering=0)

    def serving(service: Service) -> None:
        with contextlib.suppress(OSError), status:  # a supervisor gone already sends SIGTERM: the drain follows
            status.write(b"serving\n")

    async def start_worker(config: Config) -> Service:
        return await start(config, metrics=False, worker=index)  # its own executor id for durable runs

    try:
        asyncio.run(serve(config, start_worker, on_serving=serving))
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _die_with(supervisor: int) -> bool:
    """SIGTERM to this process when its parent dies; False when the parent is not `supervisor` (it died already)."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:  # pragma: no cover - valid arguments
            log.warning("cannot ask for a signal when the supervisor dies: %s", os.strerror(ctypes.get_errno()))
    # the parent-death signal follows the thread that forked this process: asyncio forks from the supervisor's
    # main thread (its event loop), which lives as long as the supervisor
    return os.getppid() == supervisor
