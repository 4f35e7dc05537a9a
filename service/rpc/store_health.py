"""The shared stores' health on the gRPC health service, each under its own name (`HealthReport`), so that probes of
the main service, and so traffic, do not depend on a store that is away."""

from __future__ import annotations

import asyncio

from grpc_health.v1.health_pb2 import HealthCheckResponse

from service.rpc.server import HealthServicer

SERVING, NOT_SERVING = HealthCheckResponse.SERVING, HealthCheckResponse.NOT_SERVING

STATE_HEALTH = "agent.v1.StateStore"  # NOT_SERVING while the shared run state cannot be reached
RECORDS_HEALTH = "agent.v1.RecordsStore"  # NOT_SERVING while records spool locally (PostgreSQL unreachable)
# NOT_SERVING while records PostgreSQL kept refusing wait in the spool's quarantine for an operator
RECORDS_QUARANTINE_HEALTH = "agent.v1.RecordsQuarantine"


class HealthReport:
    """Carries a store's health to the gRPC health service, which exists only once the server started: under the
    store's own name, so that probes of the main service (and so traffic) do not depend on it: a replica whose
    store is away still finishes its runs and (records) spools what it must write."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.health: HealthServicer | None = None
        self._sets: set[asyncio.Task[None]] = set()

    async def attach(self, health: HealthServicer, up: bool) -> None:
        self.health = health
        await self.changed(up)

    async def changed(self, up: bool) -> None:
        if self.health is not None:
            await self.health.set(self.name, SERVING if up else NOT_SERVING)

    def changed_soon(self, up: bool) -> None:
        """`changed`, for a store that notices from synchronous code; in order, the health service's set is quick."""
        if self.health is not None:
            task = asyncio.get_running_loop().create_task(self.changed(up))
            self._sets.add(task)
            task.add_done_callback(self._sets.discard)
