"""The baselines' server shell: health, the port, serve until SIGTERM. It imports only grpc, so that both the bare
server (the service's venv) and the A2A SDK's (its own venv) use it."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


async def serve_until_stopped(server: grpc.aio.Server, port: int, started: Callable[[], None] = lambda: None) -> None:
    """Add health to `server` (SERVING once started), listen on 127.0.0.1:`port`, and serve until SIGTERM/SIGINT.
    `started` runs once the server has started."""
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    if server.add_insecure_port(f"127.0.0.1:{port}") == 0:
        raise OSError(f"cannot listen on port {port}")
    await server.start()
    started()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(0)
