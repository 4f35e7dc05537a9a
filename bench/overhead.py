"""Policy overhead: µs per tool call through the executor the server builds (`build_executor`) vs awaiting the tool's
`run` directly, in one process with timeit-style loops. `python -m bench.overhead [--calls N]` prints JSON.

The executor stack is the full one: input validation, a rate limiter that never has to wait, a circuit breaker, a
hard timeout, a retry wrapper (3 attempts; the call succeeds on the first), metrics, the audit record (SQLite
under a temporary data_dir, written by its background thread) and the `tool_call` span. Rows differ only in
tracing and logging: the default no-op tracer (production without `OTEL_*` variables), an SDK tracer exporting
to nowhere, and the INFO log line the service writes per call at its default log level.

`--instructions`: instructions per call instead of times, counted by valgrind's callgrind (`bench/instructions.py`
does the same for the servicer): a figure a busy machine does not move. Each stack runs under callgrind twice, the
count switched on around `calls` and 2 × `calls` calls (audit flushes included); the difference per call is the
stack's cost. `caller` counts the calling thread only (what the p50 waits for), `all` adds the other threads: the
audit writer's work, and the polling of the flush between batches, which grows with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import logging
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import AbstractContextManager, asynccontextmanager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from pydantic import BaseModel, Field

from service import telemetry
from service.config import Config
from service.executor import Executor, RunContext, ToolCallRequest
from service.wiring import build_executor
from tools.base import JSON, Tool
from tools.policy import BreakerPolicy, RateLimitPolicy, RetryPolicy, TimeoutPolicy, ToolPolicy

STACK = (
    "build_executor: validation, rate limiter (never waits), circuit breaker, 30 s hard timeout, retry wrapper "
    "(3 attempts), metrics, SQLite audit, tool_call span; log level WARNING unless stated"
)


class NoopInput(BaseModel):
    city: str = Field(max_length=100)
    limit: int = Field(default=10, ge=1, le=100)


class Noop(Tool[NoopInput]):
    """Answers at once, so that what is measured is the machinery around the call."""

    name = "noop"
    description = "Returns its input."
    Input = NoopInput
    policy = ToolPolicy(
        timeout=TimeoutPolicy(seconds=30, mode="hard"),
        retry=RetryPolicy(attempts=3),
        breaker=BreakerPolicy(),
        rate_limit=RateLimitPolicy(rate_per_s=1e9, burst=1_000_000),
    )

    async def run(self, args: NoopInput) -> JSON:
        return {"city": args.city, "limit": args.limit}


Call = Callable[[], Awaitable[Any]]
Flush = Callable[[], Awaitable[None]]
CALL = ToolCallRequest(call_id="toolu_bench", name="noop", input={"city": "Lyon", "limit": 5})


class NullExporter(SpanExporter):
    """Takes the SDK's batches and drops them: the cost of recording spans without the cost of a collector."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


@contextmanager
def sdk_tracer() -> Iterator[None]:
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(NullExporter()))
    telemetry.use_tracer_provider(provider)
    try:
        yield
    finally:
        telemetry.use_tracer_provider(None)
        provider.shutdown()


@contextmanager
def info_log() -> Iterator[None]:
    """The service's JSON log line per call (INFO is its default level), written to memory instead of stderr."""
    telemetry.lean_log_records()  # as `setup_logging` does in the service
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    handler.setFormatter(telemetry.JsonFormatter())
    handlers, level = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


@asynccontextmanager
async def executor_call(tool: Noop, data_dir: Path) -> AsyncIterator[tuple[Call, Flush]]:
    executor: Executor = build_executor({tool.name: tool}, Config(data_dir=data_dir))
    run = RunContext(run_id="run_bench", offered=frozenset({tool.name}))

    async def call() -> Any:
        return [event async for event in executor.execute(CALL, run)]

    async def flush() -> None:
        if executor.audit is not None:
            await executor.audit.flush()

    try:
        yield call, flush
    finally:
        await executor.aclose()  # commits what is queued and stops the audit writer thread


async def nothing() -> None:
    return None


async def measure(call: Call, calls: int, flush: Flush = nothing, batch: int = 1000) -> tuple[list[float], float]:
    """Per-call wall times in µs, and CPU µs per call over the whole process (the audit writer thread included).
    The audit queue is flushed between batches, untimed: a loop this tight calls tools far faster than any run
    does, and would otherwise measure the writer's backlog rather than the call."""
    for _ in range(min(500, calls)):
        await call()
    await flush()
    samples = []
    clock = time.perf_counter_ns
    cpu0 = time.process_time()
    gc.disable()
    try:
        for start in range(0, calls, batch):
            for _ in range(min(batch, calls - start)):
                t = clock()
                await call()
                samples.append((clock() - t) / 1000)
            await flush()
    finally:
        gc.enable()
    return samples, (time.process_time() - cpu0) / calls * 1e6


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def row(measured: tuple[list[float], float]) -> dict[str, float]:
    samples, cpu_us = measured
    return {
        "p50_us": pct(samples, 0.50),
        "p99_us": pct(samples, 0.99),
        "mean_us": statistics.fmean(samples),
        "cpu_us_per_call": cpu_us,
    }


async def run(calls: int) -> dict[str, Any]:
    logging.getLogger().setLevel(logging.WARNING)  # as the benchmarked server runs (`--log-level WARNING`)
    tool = Noop()
    args = tool.validate(CALL.input)

    async def direct() -> Any:
        return await tool.run(args)

    out: dict[str, Any] = {"calls": calls, "note": STACK, "stacks": {"direct": row(await measure(direct, calls))}}
    variants: dict[str, Callable[[], AbstractContextManager[Any]]] = {
        "executor": nullcontext,
        "executor + SDK tracer (batch, null exporter)": sdk_tracer,
        "executor + INFO log line": info_log,
    }
    for name, setup in variants.items():
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp, setup():
            async with executor_call(tool, Path(tmp)) as (call, flush):
                out["stacks"][name] = row(await measure(call, calls, flush))
    base = out["stacks"]["direct"]
    for stack in out["stacks"].values():
        stack["overhead_p50_us"] = stack["p50_us"] - base["p50_us"]
        stack["overhead_p99_us"] = stack["p99_us"] - base["p99_us"]
    return out


def _switch(on: bool) -> None:
    if not os.environ.get("BENCH_OVERHEAD_CALLGRIND"):  # run without valgrind (a test of the driver)
        return
    flag = "on" if on else "off"
    subprocess.run(["callgrind_control", "-i", flag, str(os.getpid())], check=True, capture_output=True)


async def counted(stack: str, calls: int) -> None:
    """Inside callgrind: warm up, then `calls` calls of `stack` ("direct" or "executor") with the count on."""
    logging.getLogger().setLevel(logging.WARNING)
    tool = Noop()
    args = tool.validate(CALL.input)

    async def direct() -> Any:
        return await tool.run(args)

    async def go(call: Call, flush: Flush) -> None:
        await measure(call, 200, flush)  # warm-up: caches, first-call paths
        gc.disable()  # as `measure` times the calls
        _switch(True)
        last = None
        for start in range(0, calls, 1000):
            for _ in range(min(1000, calls - start)):
                last = await call()
            # the flush polls until the audit writer is done, as many times as the machine's load makes it: in a
            # thread of its own, so that the caller's count is the calls' alone (the loop blocks meanwhile)
            flusher = threading.Thread(target=asyncio.run, args=(flush(),))
            flusher.start()
            flusher.join()
        _switch(False)
        gc.enable()
        assert last == {"city": "Lyon", "limit": 5} or last[-1].status.value == "ok", last  # every call counted worked

    if stack == "direct":
        await go(direct, nothing)
        return
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        async with executor_call(tool, Path(tmp)) as (call, flush):
            await go(call, flush)


def instruction_count(stack: str, calls: int) -> tuple[int, int]:
    """(caller thread, all threads) instructions over `calls` calls of `stack`, in a fresh process under callgrind."""
    with tempfile.TemporaryDirectory(prefix="bench-overhead-cg-") as tmp:
        out = Path(tmp) / "cg.out"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes"]
        cmd += [f"--callgrind-out-file={out}", sys.executable, "-m", "bench.overhead", "--inner", stack, str(calls)]
        env = dict(os.environ, PYTHONMALLOC="malloc", PYTHONHASHSEED="0", BENCH_OVERHEAD_CALLGRIND="1")
        subprocess.run(cmd, check=True, capture_output=True, env=env, timeout=1800)
        totals = []
        for path in sorted(Path(tmp).glob("cg.out-*")):  # one file per thread, the caller's (the main thread) first
            match = re.search(r"^totals: (\d+)", path.read_text(), re.MULTILINE)
            totals.append(int(match[1]) if match else 0)
        return totals[0], sum(totals)


def instructions(calls: int) -> dict[str, Any]:
    per_call: dict[str, dict[str, float]] = {}
    for stack in ("direct", "executor"):
        once, twice = instruction_count(stack, calls), instruction_count(stack, 2 * calls)
        per_call[stack] = {"caller": (twice[0] - once[0]) / calls, "all": (twice[1] - once[1]) / calls}
    direct, executor = per_call["direct"], per_call["executor"]
    return {
        "calls": calls,
        "note": STACK,
        "instructions_per_call": {name: {k: round(v) for k, v in row.items()} for name, row in per_call.items()},
        "overhead_instructions": {k: round(executor[k] - direct[k]) for k in ("caller", "all")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000, help="calls per row (with --instructions: default 1000)")
    parser.add_argument("--instructions", action="store_true", help="callgrind's instruction counts, not times")
    parser.add_argument("--inner", nargs=2, metavar=("STACK", "CALLS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        asyncio.run(counted(args.inner[0], int(args.inner[1])))
    elif args.instructions:
        print(json.dumps(instructions(1000 if args.calls == 20000 else args.calls)))
    else:
        print(json.dumps(asyncio.run(run(args.calls))))


if __name__ == "__main__":
    main()
