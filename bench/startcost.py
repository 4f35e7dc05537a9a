"""What starting one run costs in CPU, in-process and without gRPC: the agent service's servicer (the stream's first
event and the run driver's first step, as the server runs them) against the bare baseline's servicer (its first
event). `python -m bench.startcost [--runs N] [--batches B]` prints JSON.

Runs start in batches of `runs`, as a burst of new streams does, each start followed by one turn of the event loop
(where the service's driver task takes its first step, up to its first await on the model). The CPU time of the
batch over its runs is one sample; each figure is the median over the batches. The runs are then cancelled and
forgotten before the next batch, so that every batch starts from the same state.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


async def _batches(open_stream: Open, runs: int, batches: int, settle: Callable[[], Awaitable[None]]) -> list[float]:
    """CPU µs per start, one figure per batch."""
    samples = []
    for _ in range(batches):
        streams = []
        cpu = time.thread_time()
        for _ in range(runs):
            stream = open_stream()
            await anext(stream)
            streams.append(stream)
            await asyncio.sleep(0)  # one turn of the loop: the service's driver takes its first step
        samples.append((time.thread_time() - cpu) / runs * 1e6)
        for stream in streams:
            await stream.aclose()  # the stream owns its run: closing it cancels the run
        await settle()
    return samples


async def measure(runs: int, batches: int) -> dict[str, Any]:
    workload = Workload()
    with tempfile.TemporaryDirectory(prefix="agent-startcost-") as tmp:
        config = load_config(write_service_config(workload, Path(tmp), 0, 0))
        service = await start(config, metrics=False)
        tune_gc(config.gc)  # as `serve` does
        context: Any = _Context()

        async def settle_service() -> None:
            registry = service.registry
            live = [r.task for r in registry.runs.values() if r.task is not None and not r.task.done()]
            if live:
                await asyncio.wait(live)
            registry.runs.clear()

        try:
            await _batches(lambda: service.servicer.RunAgent(REQUEST, context), runs, 2, settle_service)  # warm-up
            agent = await _batches(lambda: service.servicer.RunAgent(REQUEST, context), runs, batches, settle_service)
        finally:
            await service.server.stop(0)
            await service.close()
    bare = BareServicer(timeline(workload))

    async def settle_bare() -> None:
        await asyncio.sleep(0)

    await _batches(lambda: bare.RunAgent(REQUEST, context), runs, 2, settle_bare)
    baseline = await _batches(lambda: bare.RunAgent(REQUEST, context), runs, batches, settle_bare)
    return {
        "runs_per_batch": runs,
        "batches": batches,
        "service_us": statistics.median(agent),
        "bare_us": statistics.median(baseline),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=100, help="runs started per batch (a burst of this size)")
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(measure(args.runs, args.batches))))


if __name__ == "__main__":
    main()
