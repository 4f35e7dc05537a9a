"""Process start: builds tools, model and loop from the config, serves gRPC (with health and reflection) and the
Prometheus endpoint, and drains on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import start_http_server

from agent.v1 import agent_pb2, agent_pb2_grpc
from service import hardening, telemetry
from service.aio import abandoned
from service.config import Config, GcConfig, keepalive_options, pending_rpc_options
from service.executor import build_executor
from service.loop import AgentLoop
from service.models.base import Model
from service.models.scripted import Scenario, ScriptedModel
from service.rpc.auth import AuthInterceptor, server_credentials
from service.rpc.interceptors import RejectUndecodable, tracing_interceptors
from service.rpc.servicer import AgentServicer
from service.runs import RunRegistry
from tools import load_tools
from tools.base import Tool

log = logging.getLogger(__name__)

SERVICE_NAME = agent_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name


def build_model(config: Config) -> Model:
    """Claude when configured (or when auto and ANTHROPIC_API_KEY is set), else the offline scripted model."""
    provider = config.model.provider
    if provider == "auto":
        provider = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "scripted"
    if provider == "anthropic":
        from service.models.anthropic import AnthropicModel

        return AnthropicModel(
            default_model=config.model.name,
            timeout_s=config.model.timeout_s,
            idle_timeout_s=config.model.idle_timeout_s,
            turn_timeout_s=config.model.turn_timeout_s,
            thinking_budget=config.model.thinking_budget,
            adaptive_thinking=config.model.thinking == "adaptive",
            effort=config.model.effort,
        )
    scenario = Scenario.from_file(config.model.scenario) if config.model.scenario else Scenario.demo()
    return ScriptedModel(scenario, pacing=config.model.pacing)


def build_tools(config: Config) -> dict[str, Tool[Any]]:
    # Private to the service when made here (0700): it holds the audit log and the dead letters. A folder that is
    # already there keeps its mode (a volume's is the platform's); the databases in it are 0600 (service/store.py).
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return load_tools(config.data_dir, config.tools, extra_modules=config.tool_modules)


def warn_unavailable(tools: dict[str, Tool[Any]]) -> None:
    for name, tool in tools.items():
        if tool.unavailable:
            log.warning(
                "tool %s is unavailable on this server and left out of ListTools: %s",
                name,
                tool.unavailable,
                extra={"tool": name},
            )


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
    """A running service: the gRPC server and what it serves. `port` is the bound port (useful with port 0)."""

    config: Config
    server: grpc.aio.Server
    servicer: AgentServicer
    registry: RunRegistry
    health: HealthServicer
    model: Model
    tools: dict[str, Tool[Any]]
    port: int
    metrics_server: WSGIServer | None = None  # prometheus_client's, serving /metrics from its own thread
    health_server: grpc.aio.Server | None = None
    health_port: int | None = None
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def metrics_port(self) -> int | None:
        return None if self.metrics_server is None else int(self.metrics_server.server_port)

    async def drain(self, grace: float | None = None) -> None:
        """NOT_SERVING, refuse new runs with UNAVAILABLE, give in-flight runs `grace` seconds, then stop them with
        a retryable error event naming each run, let the streams send it, and stop the server."""
        grace = self.config.shutdown_grace_s if grace is None else grace
        log.info("draining", extra={"grace_s": grace, "active_streams": len(self.servicer.streams)})
        self.servicer.draining = True
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
        if self.health_server is not None:
            await self.health_server.stop(0)
        if self.metrics_server is not None:
            # shutdown() waits for the serving thread's loop to notice (up to its 0.5 s poll): off the event loop
            await asyncio.to_thread(self.metrics_server.shutdown)
            self.metrics_server.server_close()
        await self.registry.close()
        await self.model.aclose()
        await self.registry.loop.executor.aclose()  # flushes the audit queue
        for tool in self.tools.values():
            await tool.aclose()


async def start(
    config: Config,
    *,
    metrics: bool = True,
    tools: dict[str, Tool[Any]] | None = None,
    model: Model | None = None,
) -> Service:
    """Start serving. `tools` and `model` replace the ones the config describes (tests pass their own)."""
    tools = build_tools(config) if tools is None else tools
    warn_unavailable(tools)
    model = build_model(config) if model is None else model
    telemetry.setup_tracing()  # only when the OTEL_* environment asks for it; a no-op tracer otherwise
    loop = AgentLoop(model, build_executor(tools, config), retry=config.model.retry)
    registry = RunRegistry(loop, config.runs)
    servicer = AgentServicer(registry, tools, config)
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(servicer.auth), RejectUndecodable(), *tracing_interceptors()],
        options=[
            ("grpc.max_receive_message_length", config.limits.max_receive_bytes),
            ("grpc.so_reuseport", 0),
            # both limits: with the soft one alone, grpc refuses headers between it and 1.25x it at random
            ("grpc.max_metadata_size", config.limits.max_header_bytes),
            ("grpc.absolute_max_metadata_size", config.limits.max_header_bytes),
            *pending_rpc_options(config.limits),
            *keepalive_options(config.keepalive),
        ],
    )
    agent_pb2_grpc.add_AgentServiceServicer_to_server(servicer, server)
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if config.reflection:
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
    credentials = None if config.tls is None else server_credentials(config.tls)
    if credentials is None and any(c.token_sha256 for c in config.auth.callers):
        log.warning(
            "bearer tokens are configured but listen has no TLS: they travel in clear, which is safe only where "
            "something else encrypts the connection (a service mesh)",
            extra={"listen": config.listen},
        )
    port = _listen(server, config.listen, credentials)
    health_server, health_port = None, None
    if config.health_listen:
        # probes carry no credentials: health alone, in plaintext, on a port of its own
        health_server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = _listen(health_server, config.health_listen)
        await health_server.start()
    metrics_server = None
    if metrics:
        host, _, mport = config.metrics_listen.rpartition(":")
        try:
            metrics_server, _thread = start_http_server(int(mport), addr=host.strip("[]") or "0.0.0.0")
        except OSError as exc:
            raise OSError(f"cannot serve metrics on {config.metrics_listen}: {exc.strerror or exc}") from exc
    await server.start()
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
    service = Service(config, server, servicer, registry, health_servicer, model, tools, port, metrics_server)
    service.health_server, service.health_port = health_server, health_port
    return service


def _listen(server: grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None = None) -> int:
    try:
        if credentials is None:
            return int(server.add_insecure_port(address))
        return int(server.add_secure_port(address, credentials))
    except RuntimeError as exc:  # grpc says only "Failed to bind to address", and to ask its debug log why
        raise OSError(f"cannot listen on {address}: the port is in use, or the address is not this host's") from exc


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


async def serve(config: Config) -> None:
    """Run until SIGTERM or SIGINT, then drain. Raises StartupError when it cannot start."""
    hardening.make_undumpable()  # before anything runs a program: this process's environment holds the API key
    reaper = hardening.reap_orphans()
    try:
        service = await start(config)
    except (OSError, ValueError, ImportError) as exc:
        reaper.cancel()
        log.debug("cannot start", exc_info=True)  # the traceback, for when the message is not enough
        raise StartupError(f"cannot start: {exc}") from exc
    tune_gc(config.gc)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.create_task(service.server.wait_for_termination())
    stopper = asyncio.create_task(stop.wait())
    await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
    with contextlib.suppress(Exception):
        await service.drain()
    for task in (waiter, stopper, reaper):
        task.cancel()
    await asyncio.gather(waiter, stopper, reaper, return_exceptions=True)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.remove_signal_handler(sig)
    stuck = abandoned()
    if stuck:
        # Tasks that ignored their cancellation (a stubborn tool, `service.aio`): asyncio.run would cancel them once
        # more and wait for them without limit, keeping the pod up until it is killed. Everything worth keeping is
        # written by now (the drain closed the audit and dead-letter stores), so end the process here.
        log.warning("exiting without waiting for tasks that ignored their cancellation", extra={"tasks": len(stuck)})
        telemetry.shutdown()
        logging.shutdown()
        os._exit(0)
