"""The fleet's durable queue (base.DurableQueue) in the PostgreSQL records database: a queued SubmitRun run is a
`durable_runs` row in state 'queued' with no owner, numbered by `queue_seq`. Enqueues take a transaction-scoped
advisory lock so that the fleet-wide bound is exact (concurrent inserts would each count the others out); claims use
the database's own queue primitive, FOR UPDATE SKIP LOCKED, so two processes never claim one run and neither waits for
the other. An enqueue is announced by a NOTIFY `QUEUED` on the store's channel.

Each function runs on the checkpoint store's control connection (postgres.py), which the store holds for it.
"""

from __future__ import annotations

from typing import Any

import psycopg

from service.durable.base import DurableRun
from service.durable.batching import decode, encode

Conn = psycopg.AsyncConnection[Any]

_QUEUE_KEY = "hashtextextended(current_schema() || '.agent-durable-queue', 0)"
# the NOTIFY in the same statement, only for a row inserted (delivered at the commit)
_ENQUEUE = """
WITH ins AS (
    INSERT INTO durable_runs (run_id, owner, state, caller, background, request, queue_seq)
    SELECT %s, '', 'queued', %s, true, %s, nextval('durable_queue_seq')
    WHERE (SELECT count(*) FROM durable_runs WHERE state = 'queued') < %s
    ON CONFLICT (run_id) DO NOTHING
    RETURNING run_id
)
SELECT pg_notify(%s, %s) FROM ins
"""
_CLAIM_QUEUED = """
UPDATE durable_runs d SET owner = %s, state = 'running', updated = now()
FROM (
    SELECT run_id FROM durable_runs WHERE state = 'queued' ORDER BY queue_seq LIMIT %s FOR UPDATE SKIP LOCKED
) q
WHERE d.run_id = q.run_id
RETURNING d.run_id, d.caller, d.background, d.request, d.format, d.queue_seq
"""
_POSITION = """
SELECT count(*) FROM durable_runs
WHERE state = 'queued' AND queue_seq <= (SELECT queue_seq FROM durable_runs WHERE run_id = %s AND state = 'queued')
"""
# a row being claimed is locked: this waits for the claim's commit, then finds the run running and changes nothing
_CANCEL_QUEUED = """
UPDATE durable_runs SET state = 'cancelled', updated = now() WHERE run_id = %s AND state = 'queued' RETURNING run_id
"""
QUEUED = "queued"  # the payload of the NOTIFY that announces an enqueued run (a drain's release sends '')


async def enqueue(conn: Conn, run: DurableRun, limit: int, channel: str) -> bool:
    """Queue `run` unless `limit` runs are queued already; announced on `channel` at the commit."""
    # one round trip: BEGIN, the lock, the insert and COMMIT pipelined (half the CPU of four)
    async with conn.pipeline(), conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({_QUEUE_KEY})")
        params = (run.run_id, run.caller, encode(run.request), limit, channel, QUEUED)
        cursor = await conn.execute(_ENQUEUE, params)
    return await cursor.fetchone() is not None


async def queued(conn: Conn) -> int:
    return await _count(conn, "SELECT count(*) FROM durable_runs WHERE state = 'queued'", ())


async def claim(conn: Conn, owner: str, count: int, max_running: int | None) -> list[DurableRun]:
    """Up to `count` queued runs, oldest first, now running and `owner`'s; with `max_running`, no more than keeps the
    fleet's running background runs at most that many."""
    if max_running is None:  # one autocommit statement
        cursor = await conn.execute(_CLAIM_QUEUED, (owner, count))
    else:
        async with conn.transaction():  # the fleet's cap: claims in turn, so that two cannot both fill it
            await conn.execute(f"SELECT pg_advisory_xact_lock({_QUEUE_KEY})")
            running = await _count(conn, "SELECT count(*) FROM durable_runs WHERE state = 'running' AND background", ())
            count = min(count, max_running - running)
            if count <= 0:
                return []
            cursor = await conn.execute(_CLAIM_QUEUED, (owner, count))
    rows = sorted(await cursor.fetchall(), key=lambda r: r[5])  # oldest first
    return [
        DurableRun(run_id=r[0], caller=r[1], owner=owner, state="running", background=r[2], request=decode(r[3], r[4]))
        for r in rows
    ]


async def position(conn: Conn, run_id: str) -> int:
    return await _count(conn, _POSITION, (run_id,))


async def cancel(conn: Conn, run_id: str) -> bool:
    cursor = await conn.execute(_CANCEL_QUEUED, (run_id,))
    return await cursor.fetchone() is not None


async def _count(conn: Conn, query: str, params: tuple[Any, ...]) -> int:
    cursor = await conn.execute(query, params)
    row = await cursor.fetchone()
    assert row is not None  # count(*) has a row
    return int(row[0])
