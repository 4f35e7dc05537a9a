"""The shared state's Redis client under a burst: past its connection cap a command waits for a free connection
rather than failing (a failure there read as Redis unreachable, and runs were refused UNAVAILABLE)."""

from __future__ import annotations

import asyncio

import pytest
from backends import RedisNamespace
from redis.exceptions import DataError

from service.config import StateConfig
from service.state.redis_client import connect


async def test_a_burst_past_the_connection_cap_waits_instead_of_failing(redis_ns: RedisNamespace) -> None:
    client = connect(StateConfig(url=redis_ns.url, prefix=redis_ns.prefix, max_connections=2, timeout_s=5))
    key = f"{redis_ns.prefix}burst"
    try:
        # BLPOP with a short timeout holds its connection for that long: 20 at once need 20 connections at once
        results = await asyncio.gather(*(client.blpop([key], timeout=0.05) for _ in range(20)))
        assert results == [None] * 20
    finally:
        await client.aclose()


async def test_commands_are_packed_in_c_as_redis_py_packs_them(redis_ns: RedisNamespace) -> None:
    """The client packs commands with hiredis (redis-py's asyncio client does it in Python, argument by argument):
    the same bytes on the wire, and values of no Redis type refused as before."""
    from redis.asyncio.connection import Connection

    from service.state.redis_client import _PACKED_IN_C

    client = connect(StateConfig(url=redis_ns.url, prefix=redis_ns.prefix))
    key = f"{redis_ns.prefix}packed"
    try:
        conn = await client.connection_pool.get_connection()
        assert type(conn) is _PACKED_IN_C[Connection]
        python = Connection()  # redis-py's own packing, for comparison
        for command in [
            ("SET", key, "é ✓", "PX", 1000),
            ("XADD", key.encode(), "0-7", "f", 3, "t", "1,2", "e", b'[{"x":1}]'),
            ("CONFIG GET", "maxmemory"),
            ("ZADD", key, 1.5, "m"),
        ]:
            assert b"".join(conn.pack_command(*command)) == b"".join(python.pack_command(*command)), command
        assert b"".join(conn.pack_command("SET", key, memoryview(b"ab"))) == b"".join(
            python.pack_command("SET", key, memoryview(b"ab"))
        )  # a memoryview, which hiredis does not take: packed by redis-py
        await client.connection_pool.release(conn)
        pipe = client.pipeline(transaction=True)
        pipe.set(key, "é", px=5000)
        pipe.get(key)
        assert await pipe.execute() == [True, "é".encode()]
        with pytest.raises(DataError):
            await client.set(key, None)  # type: ignore[arg-type]
    finally:
        await client.delete(key)
        await client.aclose()
