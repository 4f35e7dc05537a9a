"""The checkpoint store of a fleet: the `durable_runs` and `run_steps` tables of the PostgreSQL records database
(migration 2 in service/records/postgres.py), written in batches (batching.py) on one connection of the store's own:
a batch of steps is one autocommit statement; one that also begins, ends or releases runs is one pipelined
transaction. A pool checkout and BEGIN/COMMIT per batch cost 2-3 times as much CPU (docs/decisions/0001).

The fence: a step or an end is written only while the run's `owner` is this process, checked in the same statement
under a share lock on the run's row, so a claim (`UPDATE … SET owner = me WHERE owner = dead`) either waits for the
write to commit (and the claimer then loads it) or is seen by it (and the write is refused: TakenOver).

Dead peers: each process holds a session advisory lock on its executor id on its control connection for as long as it
lives; PostgreSQL frees it when the process's session ends (`kill -9`, a node lost: the server sees the connection
close). Every `recover_interval_s`, `recover` tries the lock of each other owner of running runs; one it gets is
dead, and its runs are claimed, then the lock freed again (a restarting owner of that id takes it back). A poll
rather than a blocking wait on each peer's lock: that would cost a connection per peer per process. A drain's
`release` is announced by NOTIFY, so peers claim released runs at once rather than at their next look.

Connections: the writer's, the control one (own lock, claims, loads, the durable queue of pg_queue.py; one statement
at a time under an asyncio lock) and, while `recover` runs, a listener (LISTEN). Not the records pool: its spool is
for records that can wait; a checkpoint either commits or its run learns that it did not (`RecordsUnavailable`).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
from typing import Any, cast

import psycopg
from psycopg import sql

from service.durable import pg_queue
from service.durable.base import DurableRun, ExecutorIdInUse, Step, StepKind
from service.durable.batching import PRUNE_BATCH, Batch, BatchingStore, decode, encode
from service.errors import RecordsUnavailable
from service.records.postgres import UNREACHABLE, migrate

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[Any]

# 64-bit advisory-lock key of an executor id, private to the schema (as postgres.advisory_key's)
_OWNER_KEY = "hashtextextended(current_schema() || '.agent-durable-owner.' || %s, 0)"

_BEGIN = """
INSERT INTO durable_runs (run_id, owner, state, caller, background, request)
SELECT r, %s, s, c, b, q FROM unnest(%s::text[], %s::text[], %s::text[], %s::bool[], %s::text[]) AS u(r, s, c, b, q)
ON CONFLICT (run_id) DO NOTHING
"""
# One statement for a batch of steps: lock the batch's runs that are still ours (FOR SHARE: a claim waits for this
# statement), insert the steps of those, and return them (the others' steps are refused).
_STEPS = """
WITH u AS (
    SELECT * FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::bigint[], %s::text[])
        AS u(run_id, step_no, kind, key, seq, value)
), mine AS (
    SELECT run_id FROM durable_runs WHERE run_id IN (SELECT run_id FROM u) AND owner = %s FOR SHARE
), ins AS (
    INSERT INTO run_steps (run_id, step_no, kind, key, seq, value)
    SELECT u.run_id, u.step_no, u.kind, u.key, u.seq, u.value FROM u JOIN mine USING (run_id)
    ON CONFLICT (run_id, step_no) DO NOTHING
)
SELECT run_id FROM mine
"""
# The same for a batch of one step (a run alone, or the only one at a checkpoint): scalars rather than arrays, which
# cost psycopg ~0.1 ms of CPU to adapt (a third of such a checkpoint's CPU)
_STEP = """
WITH mine AS (
    SELECT run_id FROM durable_runs WHERE run_id = %s AND owner = %s FOR SHARE
), ins AS (
    INSERT INTO run_steps (run_id, step_no, kind, key, seq, value)
    SELECT run_id, %s::int, %s::text, %s::text, %s::bigint, %s::text FROM mine
    ON CONFLICT (run_id, step_no) DO NOTHING
)
SELECT run_id FROM mine
"""
_ENDS = """
UPDATE durable_runs d SET state = u.state, updated = now()
FROM unnest(%s::text[], %s::text[]) AS u(run_id, state)
WHERE d.run_id = u.run_id AND d.owner = %s
RETURNING d.run_id
"""
_RELEASE = """
UPDATE durable_runs SET owner = '', updated = now()
WHERE run_id = ANY(%s) AND owner = %s AND state = 'running'
"""
# the oldest ended runs first (index durable_runs_ended), at most a batch, their steps with them in one statement
_PRUNE = """
WITH gone AS (
    DELETE FROM durable_runs WHERE run_id IN (
        SELECT run_id FROM durable_runs WHERE state NOT IN ('running', 'queued') AND updated < to_timestamp(%s)
        ORDER BY updated LIMIT %s
    ) RETURNING run_id
), steps AS (
    DELETE FROM run_steps WHERE run_id IN (SELECT run_id FROM gone)
)
SELECT count(*) FROM gone
"""
_CLAIM = """
UPDATE durable_runs SET owner = %s, updated = now()
WHERE state = 'running' AND owner = %s AND NOT (run_id = ANY(%s))
RETURNING run_id
"""


class PgCheckpointStore(BatchingStore):
    def __init__(
        self,
        url: str,
        owner: str,
        *,
        timeout_s: float = 5.0,
        recover_interval_s: float = 1.0,
        keep_ended_s: float | None = None,
    ) -> None:
        super().__init__(owner, recover_interval_s=recover_interval_s, keep_ended_s=keep_ended_s)
        self.url = url
        self.timeout_s = timeout_s
        self._writer_conn: Conn | None = None
        self._control: Conn | None = None
        self._control_lock = asyncio.Lock()
        self._channel = ""
        self.listening = asyncio.Event()  # set once `recover` hears of releases (tests wait for it)
        self.queue_wake = asyncio.Event()

    async def open(self) -> None:
        """Connect, migrate, take this executor id's lock (waiting up to `timeout_s` for a peer that is claiming
        this id's runs right now; an id held by a live process is an error), and note this id's running runs. A
        failed open leaves nothing open (it may be tried again)."""
        try:
            await self._open()
        except BaseException:
            await self.aclose()
            raise

    async def _open(self) -> None:
        self._control = await self._connect()
        await migrate(self._control)
        schema = await self._one(self._control, "SELECT current_schema()", ())
        self._channel = "agent_durable_" + hashlib.sha256(str(schema).encode()).hexdigest()[:24]
        await self._take_own_lock(self._control)
        cursor = await self._control.execute(
            "SELECT run_id FROM durable_runs WHERE state = 'running' AND owner = %s ORDER BY created", (self.owner,)
        )
        self._leftovers = [r[0] for r in await cursor.fetchall()]
        self._writer_conn = await self._connect()
        self._start_writer()

    async def aclose(self) -> None:
        await self._stop_writer()
        for conn in (self._writer_conn, self._control):
            if conn is not None:
                await conn.close()  # the session ends: its advisory lock is freed
        self._writer_conn = self._control = None

    async def load(self, run_id: str) -> DurableRun | None:
        async with self._control_lock:
            conn = await self._control_conn()
            async with conn.transaction():  # one snapshot for the run and its steps
                cursor = await conn.execute(
                    "SELECT owner, state, caller, background, request, format, extract(epoch FROM created)::float8 "
                    "FROM durable_runs WHERE run_id = %s",
                    (run_id,),
                )
                row = await cursor.fetchone()
                if row is None:
                    return None
                cursor = await conn.execute(
                    "SELECT step_no, kind, key, seq, value, format FROM run_steps WHERE run_id = %s ORDER BY step_no",
                    (run_id,),
                )
                steps = await cursor.fetchall()
        return DurableRun(
            run_id=run_id,
            owner=row[0],
            state=row[1],
            caller=row[2],
            background=row[3],
            request=decode(row[4], row[5]),
            created=row[6] or 0.0,
            steps=[
                Step(run_id=run_id, step_no=n, kind=cast(StepKind, kind), key=key, seq=seq, value=decode(value, fmt))
                for n, kind, key, seq, value, fmt in steps
            ],
        )

    # --- the durable queue (base.DurableQueue, pg_queue.py), on the control connection ----------------------------

    async def enqueue(self, run: DurableRun, *, limit: int) -> bool:
        async with self._control_lock:
            return await pg_queue.enqueue(await self._control_conn(), run, limit, self._channel)

    async def queued(self) -> int:
        async with self._control_lock:
            return await pg_queue.queued(await self._control_conn())

    async def claim_queued(self, count: int, *, max_running: int | None = None) -> list[DurableRun]:
        async with self._control_lock:
            claimed = await pg_queue.claim(await self._control_conn(), self.owner, count, max_running)
        self._driving.update(r.run_id for r in claimed)
        return claimed

    async def prune(self, before: float) -> int:
        async with self._control_lock:
            return int(await self._one(await self._control_conn(), _PRUNE, (before, PRUNE_BATCH)))

    async def queue_position(self, run_id: str) -> int:
        async with self._control_lock:
            return await pg_queue.position(await self._control_conn(), run_id)

    async def cancel_queued(self, run_id: str) -> bool:
        async with self._control_lock:
            return await pg_queue.cancel(await self._control_conn(), run_id)

    # --- connections ------------------------------------------------------------------------------------------

    async def _connect(self) -> Conn:
        try:
            return await psycopg.AsyncConnection.connect(
                self.url, autocommit=True, connect_timeout=max(1, math.ceil(self.timeout_s))
            )
        except UNREACHABLE as exc:
            raise RecordsUnavailable("the records database does not answer; durable runs cannot start") from exc

    async def _take_own_lock(self, conn: Conn) -> None:
        try:
            async with conn.transaction():
                await conn.execute(f"SET LOCAL lock_timeout = '{int(self.timeout_s * 1000)}ms'")
                await conn.execute(f"SELECT pg_advisory_lock({_OWNER_KEY})", (self.owner,))
        except psycopg.errors.LockNotAvailable:
            raise ExecutorIdInUse(f"executor id {self.owner!r} is held by another live process") from None

    async def _control_conn(self) -> Conn:
        """The control connection; a lost one is replaced, and this id's lock taken again on the new one (runs a peer
        claimed meanwhile are its own now: their writes here are refused)."""
        if self._control is not None and not self._control.closed and not self._control.broken:
            return self._control
        if self._control is not None:
            await self._control.close()
            self._control = None
        conn = await self._connect()
        try:
            await self._take_own_lock(conn)
        except BaseException:
            await conn.close()
            raise
        self._control = conn
        return conn

    @staticmethod
    async def _one(conn: Conn, query: str, params: tuple[Any, ...]) -> Any:
        cursor = await conn.execute(query, params)
        row = await cursor.fetchone()
        return None if row is None else row[0]

    # --- the writer ---------------------------------------------------------------------------------------------

    async def _write(self, batch: Batch) -> None:
        try:
            if self._writer_conn is None or self._writer_conn.closed or self._writer_conn.broken:
                if self._writer_conn is not None:
                    await self._writer_conn.close()
                self._writer_conn = await self._connect()
            async with asyncio.timeout(self.timeout_s):
                await self._write_on(self._writer_conn, batch)
        except UNREACHABLE as exc:
            if self._writer_conn is not None:
                await self._writer_conn.close()  # the next batch connects again
                self._writer_conn = None
            raise RecordsUnavailable("the records database does not answer; the checkpoint was not written") from exc
        if batch.releases:
            self._wake.set()

    async def _write_on(self, conn: Conn, batch: Batch) -> None:
        statements: list[tuple[str, tuple[Any, ...]]] = []
        if batch.begins:
            b = batch.begins
            rows: tuple[list[Any], ...] = (
                [r.run_id for r in b],
                [r.state for r in b],
                [r.caller for r in b],
                [r.background for r in b],
            )
            statements.append((_BEGIN, (self.owner, *rows, [encode(r.request) for r in b])))
        steps_at = ends_at = -1
        if len(batch.steps) == 1:
            x = batch.steps[0]
            steps_at = len(statements)
            statements.append((_STEP, (x.run_id, self.owner, x.step_no, x.kind, x.key, x.seq, encode(x.value))))
        elif batch.steps:
            s = batch.steps
            steps_at = len(statements)
            rows = ([x.run_id for x in s], [x.step_no for x in s], [x.kind for x in s], [x.key for x in s])
            statements.append((_STEPS, (*rows, [x.seq for x in s], [encode(x.value) for x in s], self.owner)))
        if batch.ends:
            ends_at = len(statements)
            statements.append((_ENDS, ([r for r, _ in batch.ends], [st for _, st in batch.ends], self.owner)))
        if batch.releases:
            statements.append((_RELEASE, (batch.releases, self.owner)))
            statements.append(("SELECT pg_notify(%s, '')", (self._channel,)))
        if len(statements) == 1:  # the usual batch: one autocommit statement, one round trip
            cursors = [await conn.execute(*statements[0])]
        else:
            async with conn.pipeline(), conn.transaction():
                cursors = [await conn.execute(q, p) for q, p in statements]
        for at in (steps_at, ends_at):
            if at >= 0:
                batch.owned.update(r[0] for r in await cursors[at].fetchall())

    # --- recovery ------------------------------------------------------------------------------------------------

    async def recover(self, resume: Any) -> None:
        # listening before the first look: a release is then either seen by that look or announced after it
        conn = await self._listening()
        self.listening.set()
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._listen(conn), name="durable-listen")
            await super().recover(resume)

    async def _claim(self) -> list[str]:
        leftovers, self._leftovers = self._leftovers, []
        claimed = list(leftovers)
        skip = self._not_mine()
        async with self._control_lock:
            conn = await self._control_conn()
            cursor = await conn.execute(
                "SELECT DISTINCT owner FROM durable_runs WHERE state = 'running' AND owner <> %s", (self.owner,)
            )
            for (owner,) in await cursor.fetchall():
                if owner == "":  # handed over by a draining peer
                    claimed += [r[0] for r in await (await conn.execute(_CLAIM, (self.owner, "", skip))).fetchall()]
                    continue
                if not await self._one(conn, f"SELECT pg_try_advisory_lock({_OWNER_KEY})", (owner,)):
                    continue  # alive
                try:
                    taken = [r[0] for r in await (await conn.execute(_CLAIM, (self.owner, owner, skip))).fetchall()]
                finally:
                    await conn.execute(f"SELECT pg_advisory_unlock({_OWNER_KEY})", (owner,))
                if taken:
                    log.warning("durable runs of a dead peer claimed", extra={"peer": owner, "runs": len(taken)})
                claimed += taken
        return claimed

    async def _listening(self) -> Conn:
        conn = await self._connect()
        try:
            await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except BaseException:
            await conn.close()
            raise
        return conn

    async def _listen(self, conn: Conn | None) -> None:
        """Wake `recover` when a peer releases runs; on a lost connection, listen again after a pause (the polls
        go on meanwhile)."""
        while True:
            try:
                if conn is None:
                    conn = await self._listening()
                async for notify in conn.notifies():
                    if notify.payload == pg_queue.QUEUED:
                        self.queue_wake.set()
                    else:
                        self._wake.set()
            except (RecordsUnavailable, *UNREACHABLE):
                await asyncio.sleep(self.recover_interval_s)
            finally:
                if conn is not None:
                    await conn.close()
                conn = None
