"""What the live service asks of Redis per stream: the service (its paced workload, `state.url` at a Redis started
here for the purpose) serves a fixed number of streams from h2load, and Redis's own counters give, per stream, the
commands by name (`INFO commandstats`: a script's inner calls under their own names too), the commands processed,
the connections it accepted (`INFO stats`), the clients connected at the end (`CLIENT LIST`, by name and command),
and its CPU (`INFO cpu`, indicative: the machine is shared). Counts, not timings: h2load is only the client here.

    python -m bench.redis_calls [--streams 2000] [--connections 200] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import redis

from bench import h2load
from bench.h2load import Load
from bench.procs import start
from bench.redis_cost import own_redis
from bench.workload import Workload


def _counters(client: redis.Redis) -> dict[str, Any]:
    stats, cpu = client.info("stats"), client.info("cpu")
    return {
        "commands": {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in client.info("commandstats").items()},
        "connections": int(stats["total_connections_received"]),
        "processed": int(stats["total_commands_processed"]),
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
    }


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
            before = _counters(client)
            load = Load(streams, connections, 1)
            out = h2load.run(path, server, body, load, deadline=300)
            after = _counters(client)
            clients = Counter(f"{entry.get('name') or '-'} {entry.get('cmd')}" for entry in client.client_list())
            client.close()
        finally:
            server.stop()
    per_command = {
        name: round((calls - before["commands"].get(name, 0)) / streams, 3)
        for name, calls in sorted(after["commands"].items())
        if calls > before["commands"].get(name, 0) and name not in {"info", "client|list"}
    }
    return {
        "streams": streams,
        "connections": connections,
        "workers": workers,
        "h2load_succeeded": out.get("succeeded"),
        "per_stream": {
            "commands": per_command,
            "processed": round((after["processed"] - before["processed"]) / streams, 2),
            "connections_accepted": round((after["connections"] - before["connections"]) / streams, 4),
            "redis_cpu_usec": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / streams, 1),
        },
        "clients_at_end": dict(clients),
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
