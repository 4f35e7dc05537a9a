"""What the live service asks of Redis per stream: the service (its paced workload, `state.url` at a Redis started
here for the purpose) serves a fixed number of streams from h2load, and Redis's own counters give, per stream, the
commands by name with their time (`INFO commandstats`: [calls, usec]; a script's inner calls count under their own
names too, and in the script's usec), the commands processed, the connections it accepted (`INFO stats`), the
clients connected at the end (`CLIENT LIST`, by name and command), the top-level commands' time, and Redis's CPU
(`INFO cpu`, indicative: the machine is shared); and each server process's CPU and the most client connections it
held. Counts, not timings: h2load is only the client here.

    python -m bench.redis_calls [--streams 2000] [--connections 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
import redis

from bench import h2load
from bench.h2load import Load
from bench.procs import Server, start
from bench.redis_cost import SCRIPTED, counters, own_redis
from bench.workload import Workload


def _cpu_by_process(server: Server) -> dict[int, float]:
    cpu = {}
    for ps in (server.ps, *server.ps.children(recursive=True)):
        with contextlib.suppress(psutil.NoSuchProcess):
            times = ps.cpu_times()
            cpu[ps.pid] = times.user + times.system
    return cpu


class _Connections(threading.Thread):
    """Samples, every 0.2 s while the streams run, how many client connections each server process holds."""

    def __init__(self, server: Server) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.most: dict[int, int] = {}
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.2):
            for ps in (self.server.ps, *self.server.ps.children(recursive=True)):
                with contextlib.suppress(psutil.Error):
                    held = sum(
                        1
                        for c in ps.net_connections(kind="tcp")
                        if c.laddr and c.laddr.port == self.server.port and c.status == psutil.CONN_ESTABLISHED
                    )
                    self.most[ps.pid] = max(self.most.get(ps.pid, 0), held)

    def __enter__(self) -> _Connections:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def measure(streams: int, connections: int, workers: int) -> dict[str, Any]:
    path = h2load.find()
    if path is None:
        raise SystemExit(f"h2load not found: {h2load.HINT}")
    with own_redis() as url, tempfile.TemporaryDirectory(prefix="agent-redis-calls-") as tmp:
        workdir = Path(tmp)
        config = {"state": {"url": url, "prefix": "calls:"}, "workers": workers}
        server = start("service", Workload(), workdir / "service", config=config)
        try:
            client = redis.Redis.from_url(url)
            body = h2load.request_file(workdir)
            before = counters(client)
            load = Load(streams, connections, 1)
            cpu = _cpu_by_process(server)
            with _Connections(server) as conns:
                out = h2load.run(path, server, body, load, deadline=300)
            cpu = {pid: round(after_s - cpu.get(pid, 0.0), 2) for pid, after_s in _cpu_by_process(server).items()}
            after = counters(client)
            clients = Counter(f"{entry.get('name') or '-'} {entry.get('cmd')}" for entry in client.client_list())
            client.close()
        finally:
            server.stop()
    per_command = {
        name: [
            round((calls - before["commands"].get(name, 0)) / streams, 3),
            round((after["usec"][name] - before["usec"].get(name, 0.0)) / streams, 1),
        ]
        for name, calls in sorted(after["commands"].items())
        if calls > before["commands"].get(name, 0) and name not in {"info", "client|list"}
    }
    # the top-level commands' time (a script's usec include its inner calls'): the rest of Redis's CPU is its network
    # side (reading, parsing, replying, polling)
    top = {name for name in per_command if name in {"evalsha", "eval", "exec"} or name not in SCRIPTED}
    usec = sum(after["usec"].get(name, 0.0) - before["usec"].get(name, 0.0) for name in top)
    return {
        "streams": streams,
        "connections": connections,
        "workers": workers,
        "h2load_succeeded": out["requests"].get("succeeded"),
        "per_stream": {
            "commands": per_command,
            "processed": round((after["processed"] - before["processed"]) / streams, 2),
            "connections_accepted": round((after["connections"] - before["connections"]) / streams, 4),
            "command_usec": round(usec / streams, 1),
            "evalsha_usec": round(
                (after["usec"].get("evalsha", 0.0) - before["usec"].get("evalsha", 0.0)) / streams, 1
            ),
            "redis_cpu_usec": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / streams, 1),
        },
        "clients_at_end": dict(clients),
        # with --workers: the supervisor first, then each worker: its CPU seconds over the streams, and the most
        # client connections it held at once (the kernel's SO_REUSEPORT hash spreads connections, not streams)
        "cpu_s_by_process": list(cpu.values()),
        "connections_by_process": [conns.most.get(pid, 0) for pid in cpu],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    print(json.dumps(measure(args.streams, args.connections, args.workers)))


if __name__ == "__main__":
    main()
