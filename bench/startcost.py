"""What starting one run costs in CPU, in-process and without gRPC: the agent service's servicer (the stream's first
event and the run driver's first step, as the server runs them) against the bare baseline's servicer (its first
event). `python -m bench.startcost [--runs N] [--batches B] [--state redis://…]` prints JSON.

With `--state`, the service keeps its runs in that Redis (under a fresh prefix, deleted at the end) and the figures
add what the shared state costs a start: Redis round trips (requests the client sent: a pipeline is one) before each
run's first event and up to its first shipment, and the CPU of the start together with that shipment.

Runs start in batches of `runs`, as a burst of new streams does, each start followed by one turn of the event loop
(where the service's driver task takes its first step, up to its first await on the model). The CPU time of the
batch over its runs is one sample; each figure is the median over the batches. The runs are then cancelled and
forgotten before the next batch, so that every batch starts from the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from bench.bare_grpc import BareServicer
from bench.workload import Workload, timeline, write_service_config
from service.config import load_config
from service.rpc.server import tune_gc
from service.wiring import start

REQUEST = pb.RunAgentRequest(message="hello", tools=["bench_sleep"])


class _Context:
    """The little of `grpc.aio.ServicerContext` a successful start touches: no deadline, and a refused call (its
    status set, `service.rpc.status.refuse`) as an error."""

    def time_remaining(self) -> float | None:
        return None

    def set_code(self, code: grpc.StatusCode) -> None:
        raise RuntimeError(f"the call was refused: {code.name}")


Open = Callable[[], AsyncGenerator[pb.AgentEvent, None]]


class RoundTrips:
    """Requests redis-py sends (one per command, one per pipeline or transaction), counted in this process."""

    def __init__(self) -> None:
        from redis.asyncio.connection import AbstractConnection

        self.count = 0
        self._cls, self._send = AbstractConnection, AbstractConnection.send_packed_command
        sent = self._send

        async def counted(conn: Any, command: Any, check_health: bool = True) -> None:
            self.count += 1
            await sent(conn, command, check_health)

        AbstractConnection.send_packed_command = counted  # type: ignore[method-assign]

    def close(self) -> None:
        self._cls.send_packed_command = self._send  # type: ignore[method-assign]


async def _batches(
    open_stream: Open,
    runs: int,
    batches: int,
    settle: Callable[[], Awaitable[None]],
    shipped: Callable[[], Awaitable[Any]] | None = None,
    trips: RoundTrips | None = None,
) -> dict[str, list[float]]:
    """Per start, one figure per batch: CPU µs to the first event; with `shipped` (a shared store), CPU µs until the
    store has shipped the runs, and with `trips`, round trips before the first events and until shipped."""
    samples: dict[str, list[float]] = {"start_us": [], "shipped_us": [], "trips_first": [], "trips_shipped": []}
    for _ in range(batches):
        streams = []
        before = trips.count if trips else 0
        cpu = time.thread_time()
        for _ in range(runs):
            stream = open_stream()
            await anext(stream)
            streams.append(stream)
            await asyncio.sleep(0)  # one turn of the loop: the service's driver takes its first step
        samples["start_us"].append((time.thread_time() - cpu) / runs * 1e6)
        if trips:
            samples["trips_first"].append((trips.count - before) / runs)
        if shipped is not None:
            await shipped()
            samples["shipped_us"].append((time.thread_time() - cpu) / runs * 1e6)
            if trips:
                samples["trips_shipped"].append((trips.count - before) / runs)
        for stream in streams:
            await stream.aclose()  # the stream owns its run: closing it cancels the run
        await settle()
    return samples


async def measure(runs: int, batches: int, state: str | None = None) -> dict[str, Any]:
    workload = Workload()
    prefix = f"bench:startcost:{secrets.token_hex(4)}:"
    extra = {"state": {"url": state, "prefix": prefix}} if state else None
    trips = RoundTrips() if state else None
    with tempfile.TemporaryDirectory(prefix="agent-startcost-") as tmp:
        config = load_config(write_service_config(workload, Path(tmp), 0, 0, extra=extra))
        service = await start(config, metrics=False)
        tune_gc(config.gc)  # as `serve` does
        context: Any = _Context()
        store: Any = service.registry.store

        async def shipped() -> None:
            await store.shipper.flushed(10.0)

        async def settle_service() -> None:
            registry = service.registry
            live = [r.task for r in registry.runs.values() if r.task is not None and not r.task.done()]
            if live:
                await asyncio.wait(live)
            registry.runs.clear()

        def run() -> AsyncGenerator[pb.AgentEvent, None]:
            return service.servicer.RunAgent(REQUEST, context)  # type: ignore[no-any-return]

        ship = shipped if store is not None else None
        try:
            await _batches(run, runs, 2, settle_service, ship)  # warm-up
            agent = await _batches(run, runs, batches, settle_service, ship, trips)
        finally:
            await service.server.stop(0)
            await service.close()
            if trips:
                trips.close()
            if state:
                from bench.replicas import delete_keys

                delete_keys(state, prefix)
    bare = BareServicer(timeline(workload))

    async def settle_bare() -> None:
        await asyncio.sleep(0)

    await _batches(lambda: bare.RunAgent(REQUEST, context), runs, 2, settle_bare)
    baseline = await _batches(lambda: bare.RunAgent(REQUEST, context), runs, batches, settle_bare)
    figures = {
        "runs_per_batch": runs,
        "batches": batches,
        "service_us": statistics.median(agent["start_us"]),
        "bare_us": statistics.median(baseline["start_us"]),
    }
    if state:
        figures |= {
            "state": "redis",
            "service_and_shipment_us": statistics.median(agent["shipped_us"]),
            "round_trips_before_first_event": statistics.median(agent["trips_first"]),
            "round_trips_to_first_shipment": statistics.median(agent["trips_shipped"]),
        }
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="runs started per batch (a burst of this size)")
    parser.add_argument("--batches", type=int, default=30)
    parser.add_argument("--state", help="a redis:// URL: the service's runs there (default: memory://)")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.runs, args.batches, args.state))))


if __name__ == "__main__":
    main()
