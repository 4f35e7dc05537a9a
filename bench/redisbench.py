"""The benchmarks' Redis (`bench.replicas`, `bench.workers_sse`): whether it answers, its own CPU time, its version,
and the deletion of a run's keys under their prefix."""

from __future__ import annotations

import os

REDIS_URL = os.environ.get("AGENT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")


def redis_cpu_s(url: str) -> float | None:
    """The Redis server's own CPU time (`INFO cpu`), or None when it does not answer."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2) as client:
            info = client.info("cpu")
    except redis.RedisError:
        return None
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def redis_answers(url: str) -> str | None:
    """None when Redis at `url` answers PING, else why not."""
    import redis

    try:
        with redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2) as client:
            client.ping()
    except redis.RedisError as exc:
        return f"Redis at {url} does not answer ({exc})"
    return None


def delete_keys(url: str, prefix: str) -> int:
    import redis

    with redis.Redis.from_url(url) as client:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            client.delete(*keys[i : i + 1000])
    return len(keys)


def redis_version(url: str) -> str:
    import redis

    with redis.Redis.from_url(url, socket_timeout=2) as client:
        return str(client.info("server")["redis_version"])
