"""Policy overhead: µs per tool call through the executor's stack vs awaiting the tool's `run` directly, in one
process with timeit-style loops. `python -m bench.overhead [--calls N]` prints JSON.

The stack today is the executor (input validation, hard timeout, metrics, result events). The tool policies
(rate limiter, circuit breaker, retries, span) are not built yet: add them to `STACKS` when they are, and the
same measurement covers them.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import inspect
import json
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel, Field

from service.executor import Executor, ToolCallRequest
from tools.base import JSON, Tool

POLICIES_PENDING = "limiter, circuit breaker, retry wrapper and span are not in the stack yet (not built)"


class NoopInput(BaseModel):
    city: str = Field(max_length=100)
    limit: int = Field(default=10, ge=1, le=100)


class Noop(Tool[NoopInput]):
    """Answers at once, so that what is measured is the machinery around the call."""

    name = "noop"
    description = "Returns its input."
    Input = NoopInput

    async def run(self, args: NoopInput) -> JSON:
        return {"city": args.city, "limit": args.limit}


Call = Callable[[], Awaitable[Any]]
CALL = ToolCallRequest(call_id="toolu_bench", name="noop", input={"city": "Lyon", "limit": 5})


def direct(tool: Noop) -> Call:
    args = tool.validate(CALL.input)

    async def call() -> Any:
        return await tool.run(args)

    return call


def executor_stack(tool: Noop) -> Call:
    executor = Executor({tool.name: tool}, timeout_s=30)
    offered = frozenset({tool.name})
    # The executor's signature is changing while the policies land: support the run-context form and the old one.
    params = inspect.signature(executor.execute).parameters
    if "run" in params:
        from service.executor import RunContext  # type: ignore[attr-defined]

        kwargs: dict[str, Any] = {"run": RunContext(run_id="run_bench", offered=offered)}
    else:
        kwargs = {"offered": offered}

    async def call() -> Any:
        return [event async for event in executor.execute(CALL, **kwargs)]

    return call


STACKS: dict[str, Callable[[Noop], Call]] = {"direct": direct, "executor": executor_stack}


async def measure(call: Call, calls: int, warmup: int = 500) -> list[float]:
    for _ in range(warmup):
        await call()
    samples = []
    clock = time.perf_counter_ns
    gc.disable()
    try:
        for _ in range(calls):
            t = clock()
            await call()
            samples.append((clock() - t) / 1000)
    finally:
        gc.enable()
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run(calls: int) -> dict[str, Any]:
    tool = Noop()
    out: dict[str, Any] = {"calls": calls, "note": POLICIES_PENDING, "stacks": {}}
    for name, build in STACKS.items():
        samples = await measure(build(tool), calls)
        out["stacks"][name] = {
            "p50_us": pct(samples, 0.50),
            "p99_us": pct(samples, 0.99),
            "mean_us": statistics.fmean(samples),
        }
    base = out["stacks"]["direct"]
    for row in out["stacks"].values():
        row["overhead_p50_us"] = row["p50_us"] - base["p50_us"]
        row["overhead_p99_us"] = row["p99_us"] - base["p99_us"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20000)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.calls))))


if __name__ == "__main__":
    main()
