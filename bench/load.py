"""The load process: opens C concurrent `RunAgent` streams (gRPC, over several channels) or SSE requests (aiohttp)
and records, per stream, the time to the first event, to the first text token, to the end, and the event count,
and its own CPU time over the streams (`load_cpu_s`, the orchestrator's saturation check).

`python -m bench.load --proto grpc|sse --target ADDR --streams C [--hold | --go]` prints one JSON object on stdout.
With `--hold` it opens the streams, waits for each one's first event, prints `{"ready": n}`, and cancels them all
when a line arrives on stdin: the orchestrator measures the server's memory per idle open stream in between.
With `--go` it connects, prints `{"connected": n}` and starts its streams when a line arrives on stdin: the
orchestrator starts several load processes at once that way (`bench.run.run_load`), when one would be saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc


@dataclass
class Record:
    first_event_s: float | None = None
    first_token_s: float | None = None
    total_s: float | None = None
    events: int = 0
    text_chars: int = 0
    error: str | None = None


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def channel_count(streams: int) -> int:
    """About one connection per 100 streams (HTTP/2 multiplexes), at least 1, at most 64."""
    return max(1, min(64, math.ceil(streams / 100)))


class Clock:
    def __init__(self, rec: Record, opened: asyncio.Event | None) -> None:
        self.rec = rec
        self.t0 = time.perf_counter()
        self.opened = opened

    def event(self, is_token: bool) -> None:
        now = time.perf_counter() - self.t0
        self.rec.events += 1
        if self.rec.first_event_s is None:
            self.rec.first_event_s = now
            if self.opened is not None:
                self.opened.set()
        if is_token and self.rec.first_token_s is None:
            self.rec.first_token_s = now

    def end(self) -> None:
        self.rec.total_s = time.perf_counter() - self.t0


async def grpc_stream(stub: Any, rec: Record, deadline_s: float, opened: asyncio.Event | None) -> None:
    clock = Clock(rec, opened)
    call = stub.RunAgent(pb.RunAgentRequest(message="hello", tools=["bench_sleep"]), timeout=deadline_s)
    try:
        async for event in call:
            is_token = event.WhichOneof("event") == "text_delta"
            if is_token:
                rec.text_chars += len(event.text_delta.text)
            clock.event(is_token)
        clock.end()
    except grpc.aio.AioRpcError as exc:
        rec.error = exc.code().name
    finally:
        call.cancel()


async def sse_stream(session: aiohttp.ClientSession, url: str, rec: Record, opened: asyncio.Event | None) -> None:
    clock = Clock(rec, opened)
    kind = b""
    try:
        async with session.get(url, params={"message": "hello"}) as resp:
            if resp.status != 200:
                rec.error = f"HTTP {resp.status}"
                return
            async for line in resp.content:
                if line.startswith(b"event:"):
                    kind = line[6:].strip()
                elif line.startswith(b"data:"):
                    clock.event(kind == b"text_delta")
        clock.end()
    except TimeoutError:
        rec.error = "TIMEOUT"
    except (aiohttp.ClientError, OSError) as exc:
        rec.error = type(exc).__name__


async def drive(args: argparse.Namespace) -> dict[str, Any]:
    records = [Record() for _ in range(args.streams)]
    opened = [asyncio.Event() for _ in records] if args.hold else [None] * len(records)
    n_conn = args.channels or channel_count(args.streams)
    closers: list[Callable[[], Awaitable[Any]]] = []
    if args.proto == "grpc":
        opts = [("grpc.use_local_subchannel_pool", 1), ("grpc.max_receive_message_length", 16 << 20)]
        channels = [grpc.aio.insecure_channel(args.target, options=opts) for _ in range(n_conn)]
        closers += [c.close for c in channels]
        # Connected before the clock starts: a service-to-service caller keeps its channels open.
        await asyncio.wait_for(asyncio.gather(*(c.channel_ready() for c in channels)), timeout=args.deadline)
        stubs = [agent_pb2_grpc.AgentServiceStub(c) for c in channels]
    if args.go:  # the orchestrator starts every load process's streams at once
        print(json.dumps({"connected": n_conn}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if args.proto == "grpc":
        coros = [grpc_stream(stubs[i % n_conn], r, args.deadline, opened[i]) for i, r in enumerate(records)]
    else:
        timeout = aiohttp.ClientTimeout(total=args.deadline)
        sessions = [
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) for _ in range(n_conn)
        ]
        closers += [s.close for s in sessions]
        coros = [sse_stream(sessions[i % n_conn], args.target, r, opened[i]) for i, r in enumerate(records)]
    started = time.perf_counter()
    cpu0 = time.process_time()  # all threads: grpc's own threads work for the load too
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        if args.hold:
            waits = [asyncio.create_task(e.wait()) for e in opened if e is not None]
            await asyncio.wait(waits, timeout=args.deadline)
            for w in waits:
                w.cancel()
            ready = sum(1 for r in records if r.first_event_s is not None)
            print(json.dumps({"ready": ready}), flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
            for t in tasks:
                t.cancel()
        else:
            await asyncio.wait(tasks, timeout=args.deadline + 5)
        wall = time.perf_counter() - started
        cpu = time.process_time() - cpu0
        for t, r in zip(tasks, records, strict=True):
            if not t.done() and r.error is None and not args.hold:
                r.error = "TIMEOUT"
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for close in closers:
            await close()
    return {"wall_s": wall, "load_cpu_s": cpu, "connections": n_conn, "records": [asdict(r) for r in records]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--proto", choices=["grpc", "sse"], required=True)
    parser.add_argument("--target", required=True, help="HOST:PORT for gRPC, the /run URL for SSE")
    parser.add_argument("--streams", type=int, required=True)
    parser.add_argument("--channels", type=int, default=0, help="connections to spread over; default C/100")
    parser.add_argument("--deadline", type=float, default=60.0, help="seconds before unfinished streams are cut")
    parser.add_argument("--hold", action="store_true", help="hold the streams open until a line on stdin")
    parser.add_argument("--go", action="store_true", help="connect, then start the streams on a line on stdin")
    args = parser.parse_args()
    raise_fd_limit()
    print(json.dumps(asyncio.run(drive(args))), flush=True)


if __name__ == "__main__":
    main()
