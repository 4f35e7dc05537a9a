"""What a short run costs the Redis server: the commands and the microseconds Redis spent on them (`INFO
commandstats`), and its CPU (`INFO cpu`), over `runs` short runs (start, one delta, end) through the servicer with
`state.url` at a Redis started here for the purpose (the shared one serves other clients, whose commands would count
too). The same calls as `bench.instructions`, whose count is the service's side of the same work.

    python -m bench.redis_cost [--runs 1000] [--in-flight 20]

Prints JSON: per run, Redis's usec by command (commandstats), their sum, commands, and Redis's CPU (user + sys).
Commandstats counts a script's inner calls under their own names as well as under EVAL/EVALSHA (whose usec include
them): the sum is over the top-level commands only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import redis

from bench.instructions import SHORT_EVENTS, _drive

# Commands a script or a transaction runs, counted under their own names too: left out of the sums when one ran them
# (and a script's call too, when transactions ran: it was in one).
SCRIPTED = {"hset", "pexpire", "expire", "zadd", "zrem", "zremrangebyscore", "xadd", "time", "xrevrange", "hgetall"}
TOP = {"eval", "evalsha", "fcall", "exec"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _stats(client: redis.Redis) -> tuple[dict[str, tuple[int, float]], float]:
    commands = {
        name.removeprefix("cmdstat_"): (int(value["calls"]), float(value["usec"]))
        for name, value in client.info("commandstats").items()
    }
    cpu = client.info("cpu")
    return commands, float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])


def counters(client: redis.Redis) -> dict[str, Any]:
    """Redis's own counters: commands by name (calls, usec), connections accepted, commands processed, CPU s."""
    stats, cpu, commands = client.info("stats"), client.info("cpu"), client.info("commandstats").items()
    return {
        "commands": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in commands},
        "usec": {k.removeprefix("cmdstat_"): float(v["usec"]) for k, v in commands},
        "connections": int(stats["total_connections_received"]),
        "processed": int(stats["total_commands_processed"]),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


@contextlib.contextmanager
def own_redis() -> Iterator[str]:
    """A redis-server of this measurement's own, on a free port, without persistence: its URL."""
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="agent-redis-cost-") as tmp:
        server = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
            + ["--dir", tmp],
            stdout=subprocess.DEVNULL,
        )
        try:
            url = f"redis://127.0.0.1:{port}/0"
            client = redis.Redis.from_url(url)
            for _ in range(200):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            client.close()
            yield url
        finally:
            server.terminate()
            server.wait()


def measure(runs: int, in_flight: int) -> dict[str, Any]:
    with own_redis() as url:
        client = redis.Redis.from_url(url)
        seen: list[tuple[dict[str, tuple[int, float]], float]] = []
        mark = lambda on: seen.append(_stats(client))  # noqa: E731
        asyncio.run(_drive("service", SHORT_EVENTS, runs, in_flight, url, mark=mark))
        client.close()
    (before, cpu_before), (after, cpu_after) = seen
    per_command = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0.0))
        if calls > calls0 and name not in {"info"}:
            per_command[name] = {"calls": round((calls - calls0) / runs, 3), "usec": round((usec - usec0) / runs, 2)}
    inner = SCRIPTED if any(name in TOP for name in per_command) else set()
    if "exec" in per_command:
        inner = inner | {"eval", "evalsha", "fcall"}
    counted = {n: v for n, v in per_command.items() if n not in inner}
    return {
        "runs": runs,
        "in_flight": in_flight,
        "usec_per_run": round(sum(v["usec"] for v in counted.values()), 2),
        "commands_per_run": round(sum(v["calls"] for v in counted.values()), 3),
        "cpu_usec_per_run": round((cpu_after - cpu_before) * 1e6 / runs, 1),
        "by_command": per_command,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--in-flight", type=int, default=20)
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("redis-server is missing")
    print(json.dumps(measure(args.runs, args.in_flight)))


if __name__ == "__main__":
    main()
