"""The records database on PostgreSQL (`records.url: postgresql://…`): the connection pool, the versioned schema, and
what happens while the database cannot be reached.

Schema: `MIGRATIONS` are applied in order at start, each recorded in `schema_migrations`, under an advisory lock so
that replicas starting together migrate once and never race. A database migrated by a newer version is used as is
(its extra tables and columns are ignored), which a rolling deploy needs.

Unreachable: a write that fails (or that finds the database down already) goes to the local spool (`spool.py`, a
SQLite file under data_dir) instead, and the pump task writes the spool to PostgreSQL, oldest first, once it answers
again. While anything is spooled, new writes go behind it, so the audit rows of this process keep their order. The
state is logged on each change and exported as `agent_records_up` and `agent_records_pending`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from service import telemetry
from service.records.spool import Spool

log = logging.getLogger(__name__)

Conn = psycopg.AsyncConnection[Any]
# Writes a batch of one kind of record in one transaction of its own; idempotent (a batch may be sent again when the
# answer to its COMMIT was lost).
Writer = Callable[[Conn, list[dict[str, Any]]], Awaitable[None]]

_DRAIN_BATCH = 500
# What says "the database is not there" (connection refused or lost, pool timeout, a transaction rolled back by the
# server): records then spool. Any other error (a bug, data PostgreSQL refuses) is raised: spooling it would retry
# it for ever.
UNREACHABLE = (psycopg.OperationalError, psycopg.InterfaceError, OSError, TimeoutError)
# psycopg_pool retries a lost connection with a doubling delay until this many seconds, then gives up on it until
# the next request grows the pool again: a short cycle bounds how long recovery waits after the database is back.
_RECONNECT_CYCLE_S = 8.0


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


# Append only: a migration that has shipped is never edited (replicas of the old version may be running it).
# Text columns rather than JSONB for input and metadata: the audit MAC covers the text as stored, byte for byte.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "audit log, dead letters, run summaries",
        """
        CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            run_id TEXT NOT NULL,
            metadata TEXT NOT NULL,
            tool TEXT NOT NULL,
            call_id TEXT NOT NULL,
            input TEXT NOT NULL,
            status TEXT NOT NULL,
            duration_s DOUBLE PRECISION NOT NULL,
            result_bytes BIGINT NOT NULL,
            attempts INTEGER NOT NULL,
            cache_hit INTEGER NOT NULL,
            answered_by TEXT NOT NULL,
            trace_id TEXT NOT NULL,
            record_id TEXT NOT NULL UNIQUE,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            key_id TEXT
        );
        CREATE INDEX audit_run ON audit (run_id);
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL,
            key_id TEXT,
            mac TEXT
        );
        CREATE TABLE dead_letters (
            execution_id TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            run_id TEXT NOT NULL,
            call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            input TEXT NOT NULL,
            status TEXT NOT NULL,
            error_type TEXT NOT NULL,
            message TEXT NOT NULL,
            traceback TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            trace_id TEXT NOT NULL
        );
        CREATE INDEX dead_letters_created ON dead_letters (created_at);
        CREATE INDEX dead_letters_tool ON dead_letters (tool, created_at);
        CREATE TABLE run_summaries (
            run_id TEXT PRIMARY KEY,
            caller TEXT NOT NULL,
            state TEXT NOT NULL,
            last_seq BIGINT NOT NULL,
            created_ns BIGINT NOT NULL,
            ended_ns BIGINT NOT NULL,
            outcome TEXT,
            trace_id TEXT NOT NULL
        );
        CREATE INDEX run_summaries_ended ON run_summaries (ended_ns);
        """,
    ),
    # service/durable/postgres.py; JSON as text in `request` and `value`, in the version `format` says
    Migration(
        2,
        "durable runs and their checkpoints",
        """
        CREATE TABLE durable_runs (
            run_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            state TEXT NOT NULL,
            caller TEXT NOT NULL,
            background BOOLEAN NOT NULL,
            request TEXT NOT NULL,
            format SMALLINT NOT NULL DEFAULT 1,
            created TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX durable_runs_running ON durable_runs (owner) WHERE state = 'running';
        CREATE TABLE run_steps (
            run_id TEXT NOT NULL,
            step_no INTEGER NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            seq BIGINT NOT NULL,
            value TEXT NOT NULL,
            format SMALLINT NOT NULL DEFAULT 1,
            PRIMARY KEY (run_id, step_no)
        );
        """,
    ),
    # ListRuns (service/listing.py) and completion push (service/push/): times in ns since the epoch
    Migration(
        3,
        "run listing and callback deliveries",
        """
        CREATE INDEX run_summaries_caller ON run_summaries (caller, created_ns, run_id);
        CREATE TABLE callback_deliveries (
            delivery_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            caller TEXT NOT NULL,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            state TEXT NOT NULL,
            body TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_ns BIGINT NOT NULL,
            ended_ns BIGINT NOT NULL DEFAULT 0,
            next_ns BIGINT NOT NULL DEFAULT 0,
            lease_ns BIGINT NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX callback_deliveries_due ON callback_deliveries (next_ns) WHERE state = 'pending';
        CREATE INDEX callback_deliveries_waiting ON callback_deliveries (created_ns) WHERE state = 'waiting';
        """,
    ),
)


def advisory_key(name: str) -> str:
    """SQL for a 64-bit advisory-lock key private to the current schema (advisory locks are database-wide, and
    several services, or tests, may share a database under different schemas)."""
    return f"hashtextextended(current_schema() || '.{name}', 0)"


async def migrate(conn: Conn) -> list[int]:
    """Apply the migrations this database lacks, in one transaction under an advisory lock; the versions applied.
    A second replica starting at the same moment waits for the lock, then finds nothing left to do."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({advisory_key('agent-records-migrations')})")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {int(row[0]) for row in await cursor.fetchall()}
        applied = []
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            await conn.execute(migration.sql.encode())  # no parameters: several statements in one go
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied.append(migration.version)
    newest = max(done, default=0)
    if newest > MIGRATIONS[-1].version:
        log.warning(
            "the records database was migrated by a newer version; this one uses the tables it knows",
            extra={"schema_version": newest, "known_version": MIGRATIONS[-1].version},
        )
    if applied:
        log.info("records database migrated", extra={"applied": applied})
    return applied


class PgRecords:
    """One per process: the pool, the schema, the reachability state, the spool and its pump. The stores register a
    `Writer` per kind of record and hand their batches to `write`; `open` connects and migrates (or, the database
    being away, leaves that to the pump) and `release` by the last store closes everything."""

    def __init__(
        self,
        url: str,
        *,
        spool_path: Path,
        pool_min: int = 1,
        pool_max: int = 8,
        timeout_s: float = 5.0,
        retry_s: float = 1.0,
    ) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.pool = AsyncConnectionPool(
            url,
            min_size=pool_min,
            max_size=max(pool_min, pool_max),
            timeout=timeout_s,
            open=False,
            name="records",
            kwargs={"autocommit": True, "connect_timeout": max(1, math.ceil(timeout_s))},
            check=AsyncConnectionPool.check_connection,  # a connection the server dropped is replaced, not used
            reconnect_timeout=_RECONNECT_CYCLE_S,
        )
        self.up = False  # reachable and migrated
        self._reported_down = False
        self._migrated = False
        self._writers: dict[str, Writer] = {}
        self._spool_path = spool_path
        self._spool: Spool | None = None
        self._spooled = 0  # entries in the spool file, as of this process's last look
        self._disk = ThreadPoolExecutor(max_workers=1, thread_name_prefix="records-spool")
        self._retry_s = retry_s
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._pump: asyncio.Task[None] | None = None
        self._users = 0
        self._opened = False
        self._open_lock = asyncio.Lock()
        self._closed = False
        # told of each change of reachability (the composition root shows it on the gRPC health service)
        self.on_health: Callable[[bool], None] | None = None
        telemetry.RECORDS_UP.set(0)

    def register(self, kind: str, writer: Writer, *, owner: bool = True) -> PgRecords:
        """`writer` writes the records of `kind` (from `write`, and from the spool); an `owner` store keeps the
        database open until it calls `release`."""
        self._writers[kind] = writer
        self._users += owner
        return self

    @property
    def pending(self) -> int:
        """Records waiting in the local spool for the database."""
        return self._spooled

    async def open(self) -> None:
        """Open the pool, the spool, and try the database once (bounded by `timeout_s`): migrated now, or by the pump
        once the database answers. Never raises for an unreachable database: the service runs without it."""
        async with self._open_lock:  # a first write may race the composition root's open
            if self._opened:
                return
            await self.pool.open(wait=False)
            self._spool = await self._on_disk(Spool, self._spool_path)
            self._spooled = await self._on_disk(self._spool.count)
            self._set_pending()
            if self._spooled:
                log.warning("records wait in the local spool from an earlier run", extra={"pending": self._spooled})
            await self._ensure_up()
            self._pump = asyncio.get_running_loop().create_task(self._pump_loop(), name="records-pump")
            self._opened = True

    async def write(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        """Write `bodies` now, or spool them (on disk) when the database is away or something is spooled already.
        Returns once they are in one or the other; raises only when both failed."""
        if not self._opened:
            await self.open()  # a store built without the composition root's `open` (a script, a bench)
        if self.up and not self._spooled:
            try:
                async with asyncio.timeout(self.timeout_s), self.pool.connection() as conn:
                    await self._writers[kind](conn, bodies)
                return
            except UNREACHABLE as exc:
                self._went_down(exc)
        await self._spill(kind, bodies)

    async def settle(self) -> None:
        """Wait until the spool is empty (tests, and a drain at shutdown)."""
        while self._spooled:
            self._drained.clear()
            self._wake.set()
            await self._drained.wait()

    @contextlib.asynccontextmanager
    async def connection(self) -> Any:
        async with asyncio.timeout(self.timeout_s), self.pool.connection() as conn:
            yield conn

    async def release(self) -> None:
        """A store is done; the last one closes the pump (after one more drain attempt), the spool and the pool."""
        self._users -= 1
        if self._users > 0 or self._closed:
            return
        self._closed = True
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
            if self._spooled and self.up:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._drain(), self.timeout_s)
        if self._spooled:
            log.warning(
                "records left in the local spool: the next start sends them to the database",
                extra={"pending": self._spooled, "spool": str(self._spool_path)},
            )
        if self._spool is not None:
            await self._on_disk(self._spool.close)
        self._disk.shutdown(wait=True)
        await self.pool.close()

    async def _on_disk(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._disk, fn, *args)

    async def _spill(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        assert self._spool is not None, "open() first"
        await self._on_disk(self._spool.put, kind, bodies)
        self._spooled += len(bodies)
        self._set_pending()
        self._wake.set()

    def _set_pending(self) -> None:
        telemetry.RECORDS_PENDING.set(self._spooled)

    async def _ensure_up(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout_s), self.pool.connection() as conn:
                if not self._migrated:
                    await migrate(conn)
                    self._migrated = True
        except UNREACHABLE as exc:
            self._went_down(exc)
            return False
        self._reported_down = False
        if not self.up:
            self.up = True
            telemetry.RECORDS_UP.set(1)
            log.info("records database reachable", extra={"pending": self._spooled})
            if self.on_health is not None:
                self.on_health(True)
        return True

    def _went_down(self, exc: BaseException) -> None:
        if not self._reported_down:
            self._reported_down = True
            log.warning(
                "records database unreachable; records wait in the local spool until it answers",
                extra={"error": f"{type(exc).__name__}: {exc}"[:500], "spool": str(self._spool_path)},
            )
            if self.on_health is not None:
                self.on_health(False)
        self.up = False
        telemetry.RECORDS_UP.set(0)

    async def _pump_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._retry_s):
                    await self._wake.wait()
            self._wake.clear()
            if not (self.up or self._spooled):
                await self._ensure_up()  # a probe while idle: `up` is right when the next record comes
            if self._spooled and (self.up or await self._ensure_up()):
                try:
                    await self._drain()
                except UNREACHABLE as exc:
                    self._went_down(exc)
                except Exception:  # a bug, or data refused: keep the pump alive, the entries stay spooled
                    log.exception("records spool drain failed", extra={"pending": self._spooled})
            if not self._spooled:
                self._drained.set()

    async def _drain(self) -> None:
        """Send the spool to the database, oldest first, each run of one kind in one transaction; an entry leaves
        the spool only after its transaction committed."""
        spool = self._spool
        assert spool is not None
        if not spool.try_lock():
            return  # another process of this machine is draining the same file
        try:
            while True:
                entries = await self._on_disk(spool.first, _DRAIN_BATCH)
                if not entries:
                    self._spooled = 0
                    break
                start = 0
                while start < len(entries):
                    end = start
                    while end < len(entries) and entries[end].kind == entries[start].kind:
                        end += 1
                    run = entries[start:end]
                    writer = self._writers.get(run[0].kind)
                    if writer is None:  # a kind no store of this process writes: left for one that does
                        log.error("spooled records of an unknown kind", extra={"kind": run[0].kind})
                        return
                    async with asyncio.timeout(self.timeout_s), self.pool.connection() as conn:
                        await writer(conn, [e.body for e in run])
                    await self._on_disk(spool.remove, [e.id for e in run])
                    start = end
                self._spooled = await self._on_disk(spool.count)
                self._set_pending()
            log.info("records spool sent to the database")
        finally:
            spool.unlock()
            self._set_pending()
