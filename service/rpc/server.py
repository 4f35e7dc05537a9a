"""The gRPC server process: serves the servicer the composition root (`service/wiring.py`) built, with health,
reflection and the Prometheus endpoint, and drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from prometheus_client import start_http_server

from agent.v1 import agent_pb2, agent_pb2_grpc
from service import hardening, tally, telemetry
from service.aio import abandoned
from service.config import Config, GcConfig, KeepaliveConfig, Limits
from service.executor import Executor
from service.models.base import Model
from service.rpc.accept import AcceptAhead
from service.rpc.auth import server_credentials
from service.rpc.interceptors import guarded_server
from service.rpc.servicer import AgentServicer
from service.rpc.status import UnknownMethods
from service.runs import RunRegistry
from tools.base import Tool

if TYPE_CHECKING:
    from service.http.server import HttpServer  # the HTTP face, imported only where it is built (wiring.py)
    from service.push.pusher import Pusher

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio-health-checking's servicer, with `List`: health.proto has it (and reflection lists it), but the
    library's asyncio servicer answers it with UNIMPLEMENTED and logs a traceback on every call."""

    async def List(
        self, request: health_pb2.HealthListRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthListResponse:
        # the library keeps the statuses in `_server_status`; tests/test_server.py checks List against Check
        statuses = {name: health_pb2.HealthCheckResponse(status=s) for name, s in self._server_status.items()}
        return health_pb2.HealthListResponse(statuses=statuses)


@dataclass
class Service:
    """A running service: the gRPC server, what it serves, and the parts the composition root built for it, which
    `close` closes. `port` is the bound port (useful with port 0)."""

    config: Config
    server: grpc.aio.Server
    servicer: AgentServicer
    health: HealthServicer
    port: int
    registry: RunRegistry
    accept: AcceptAhead
    model: Model
    executor: Executor
    tools: Mapping[str, Tool[Any]]
    metrics_server: WSGIServer | None = None  # prometheus_client's, serving /metrics from its own thread
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    http: HttpServer | None = None  # the HTTP face, on this event loop (`http_listen`)
    push: Pusher | None = None  # completion push's sender, closed after the runs (their ends schedule deliveries)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def http_port(self) -> int | None:
        return None if self.http is None else self.http.port

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else int(self.metrics_server.server_port)

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new runs with UNAVAILABLE, give in-flight runs `grace` seconds, then stop them with
        a retryable error event naming each run, let the streams send it, and stop the server."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace, "active_streams": len(self.servicer.streams)})
        self.servicer.api.draining = True
        await self.health.enter_graceful_shutdown()
        await self.registry.shutdown(grace)
        streams = list(self.servicer.streams)
        if streams:
            await asyncio.wait(streams, timeout=2.0)
        await self.server.stop(1.0)
        await self.close()

    async def close(self) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        await self.accept.stop()
        if self.http is not None:
            await self.http.stop()
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            # shutdown() waits for the serving thread's loop to notice (up to its 0.5 s poll): off the event loop
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        await self.registry.close()
        if self.push is not None:
            await self.push.aclose()
        await self.model.aclose()
        await self.executor.aclose()  # flushes the audit queue
        for tool in self.tools.values():
            await tool.aclose()


async def start_server(
    config: Config,
    servicer: AgentServicer,
    *,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
    registry: RunRegistry,
    model: Model,
    executor: Executor,
    tools: Mapping[str, Tool[Any]],
    metrics: bool = True,
    http: HttpServer | None = None,
) -> Service:
    """Serve `servicer` (with health and reflection) where `config` says, and /metrics unless `metrics` is False.
    The other parts are the servicer's, handed over to be closed with the service."""
    server, register, accept = guarded_server(
        interceptors, server_options(config), config.limits.accept_ahead, (SERVICE_NAME,)
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, register)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, register)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        # what `reflection.enable_server_reflection` does for an aio server, which it tells by the server's class
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(reflection.aio.ReflectionServicer(names), register)
    register.add_generic_rpc_handlers((UnknownMethods(),))  # last: asked only about methods no service has
    credentials = None if config.tls is None else server_credentials(config.tls)
    if credentials is None and any(c.token_sha256 for c in config.auth.callers):
        log.warning(
            "bearer tokens are configured but listen has no TLS: they travel in clear, which is safe only where "
            "something else encrypts the connection (a service mesh)",
            extra={"listen": config.listen},
        )
    port = listen_on(server, config.listen, credentials)
    health_server, health_port = None, None
    if config.health_listen:
        # probes carry no credentials: health alone, in plaintext, on a port of its own
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = listen_on(health_server, config.health_listen)
        await health_server.start()
    metrics_server = None
    if metrics:
        host, _, mport = config.metrics_listen.rpartition(":")
        try:
            metrics_server, _thread = start_http_server(int(mport), addr=host.strip("[]") or "0.0.0.0")
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {config.metrics_listen}: {exc.strerror or exc}") from exc
    await server.start()
    accept.start()
    if http is not None:
        await http.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving",
        extra={
            "listen": config.listen,
            "port": port,
            "metrics_port": metrics_server.server_port if metrics_server else None,
            "model": model.default_model,
        },
    )
    return Service(
        config,
        server,
        servicer,
        health_servicer,
        port,
        registry,
        accept,
        model,
        executor,
        tools,
        metrics_server=metrics_server,
        health_server=health_server,
        health_port=health_port,
        http=http,
    )


def server_options(config: Config) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", config.limits.max_receive_bytes),
        # off for one process, so that a port already in use is an error rather than silently shared; on for the
        # workers of `--workers N`, which share theirs (service/rpc/workers.py)
        ("grpc.so_reuseport", int(config.workers > 1)),
        # both limits: with the soft one alone, grpc refuses headers between it and 1.25x it at random
        ("grpc.max_metadata_size", config.limits.max_header_bytes),
        ("grpc.absolute_max_metadata_size", config.limits.max_header_bytes),
        *pending_rpc_options(config.limits),
        *keepalive_options(config.keepalive),
    ]


def keepalive_options(keepalive: KeepaliveConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.keepalive_time_ms", round(keepalive.time_s * 1000)),
        ("grpc.keepalive_timeout_ms", round(keepalive.timeout_s * 1000)),
        ("grpc.http2.min_ping_interval_without_data_ms", round(keepalive.min_client_ping_interval_s * 1000)),
        ("grpc.keepalive_permit_without_calls", int(keepalive.permit_without_calls)),
        # our own pings on a quiet connection: without this grpc stops after 2 with no data sent in between
        ("grpc.http2.max_pings_without_data", 0),
    ]


def pending_rpc_options(limits: Limits) -> list[tuple[str, int]]:
    """grpc core queues calls until the server takes them up; grpc.aio takes up one per turn of the event loop, so a
    burst of new streams while the loop is busy with running ones waits there. Past the soft limit grpc cancels new
    calls at random, past the hard one all of them, and any call that waited too long (CANCELLED, for 2,000 of 5,000
    streams opened at once with grpc's defaults: 1,000, 3,000 and 30 s). Same proportions as grpc's, larger; the
    caller's deadline still bounds the wait."""
    return [
        ("grpc.server.max_pending_requests", limits.max_pending_rpcs // 3),
        ("grpc.server.max_pending_requests_hard_limit", limits.max_pending_rpcs),
        ("grpc.server_max_unrequested_time_in_server", limits.max_pending_s),
    ]


def listen_on(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        if credentials is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, credentials))
    except RuntimeError as exc:  # grpc says only "Failed to bind to address", and to ask its debug log why
        if address.startswith(("unix:", "unix-abstract:")):
            why = "the socket's folder is missing or cannot be written, or another server holds the socket"
        else:
            why = "the port is in use, or the address is not this host's"
        raise OSError(f"cannot listen on {address}: {why}") from exc


def tune_gc(config: GcConfig) -> None:
    """Process-wide, so called by `serve` only: objects made at start-up (modules, tools, schemas) are frozen out of
    the collector's scans, and collections are made rarer (the service makes short-lived cycles at a modest rate)."""
    if config.freeze:
        gc.collect()
        gc.freeze()
    gc.set_threshold(*config.thresholds)


class StartupError(Exception):
    """The service cannot start as configured: a port it cannot listen on, or something the config names (a tool
    module or option, a scenario, a TLS file, a store) that cannot be loaded."""


async def serve(
    config: Config,
    start: Callable[[Config], Awaitable[Service]],
    *,
    on_serving: Callable[[Service], object] | None = None,
) -> None:
    """Start the service with `start` (the composition root's), call `on_serving` (a worker tells its supervisor),
    run until SIGTERM or SIGINT, then drain. Raises StartupError when it cannot start."""
    hardening.make_undumpable()  # before anything runs a program: this process's environment holds the API key
    reaper = hardening.reap_orphans()
    try:
        service = await start(config)
    except (OSError, ValueError, ImportError) as exc:
        reaper.cancel()
        log.debug("cannot start", exc_info=True)  # the traceback, for when the message is not enough
        raise StartupError(f"cannot start: {exc}") from exc
    tune_gc(config.gc)
    # under --workers N a worker's gauges read at the scrape are written to its metrics files instead
    observer = asyncio.create_task(tally.keep_observed(), name="observed-gauges") if tally.multiprocess() else None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_serving is not None:  # once a SIGTERM drains: a supervisor may stop its workers as soon as they serve
        on_serving(service)
    waiter = asyncio.create_task(service.server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    with contextlib.suppress(Exception):
        await service.drain()
    tasks = [task for task in (waiter, stopper, reaper, observer) if task is not None]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    stuck = abandoned()
    if stuck:
        # Tasks that ignored their cancellation (a stubborn tool, `service.aio`): asyncio.run would cancel them once
        # more and wait for them without limit, keeping the pod up until it is killed. Everything worth keeping is
        # written by now (the drain closed the audit and dead-letter stores), so end the process here.
        log.warning("exiting without waiting for tasks that ignored their cancellation", extra={"tasks": len(stuck)})
        telemetry.shutdown()
        tally.flush()  # what was counted since the last flush (under --workers, written through every second)
        logging.shutdown()
        os._exit(0)
