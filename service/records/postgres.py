"""The records database on PostgreSQL (`records.url: postgresql://…`): the connection pool, the versioned schema, and
what happens while the database cannot be reached.

Schema: `MIGRATIONS` are applied in order at start, each recorded in `schema_migrations`, under an advisory lock so
that replicas starting together migrate once and never race. A database migrated by a newer version is used as is
(its extra tables and columns are ignored), which a rolling deploy needs.

Unreachable: a write that fails (or that finds the database down already) goes to the local spool (`spool.py`, a
SQLite file under data_dir) instead, and the pump task writes the spool to PostgreSQL, oldest first, once it answers
again. While anything is spooled, new writes go behind it, so the audit rows of this process keep their order. The
state is logged on each change and exported as `agent_records_up` and `agent_records_pending`.

Refused: a batch PostgreSQL refuses for what it holds (`PERMANENT`: a value out of range, a constraint) goes to the
spool too, and the drain sends a refused run of entries one by one, so the others go in. An entry refused
`max_refusals` times in a row is moved to the spool file's quarantine (`spool.py`), logged, counted in
`agent_records_quarantined` and told to `on_quarantine`; the drain goes on behind it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from service import telemetry
from service.records.pg_schema import MIGRATIONS as MIGRATIONS
from service.records.pg_schema import Migration as Migration
from service.records.pg_schema import advisory_key as advisory_key
from service.records.pg_schema import migrate as migrate
from service.records.spool import Entry, Spool

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
# What says "the database will not take this record", however often it is sent: the data (DataError: a number out of
# range, text it cannot store; UnicodeError: text the driver cannot encode) or a constraint (IntegrityError).
# Not a bug of the writer's (ProgrammingError: a missing column would refuse every record, and must be fixed, not
# quarantined record by record).
PERMANENT = (psycopg.DataError, psycopg.IntegrityError, UnicodeError)
# psycopg_pool retries a lost connection with a doubling delay until this many seconds, then gives up on it until
# the next request grows the pool again: a short cycle bounds how long recovery waits after the database is back.
_RECONNECT_CYCLE_S = 8.0


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
        max_refusals: int = 3,
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
        self.quarantined = 0  # entries in the spool file's quarantine, as of this process's last look
        self.max_refusals = max_refusals
        self._refusals: dict[int, int] = {}  # spool entry id: refusals in a row
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
        self.on_quarantine: Callable[[int], None] | None = None  # told the quarantine's size when it changes
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
            self.quarantined = await self._on_disk(self._spool.quarantine_count)
            self._set_pending()
            if self._spooled:
                log.warning("records wait in the local spool from an earlier run", extra={"pending": self._spooled})
            if self.quarantined:
                log.error(
                    "records are quarantined in the local spool: see python -m service.records.spool list",
                    extra={"quarantined": self.quarantined, "spool": str(self._spool_path)},
                )
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
            except PERMANENT as exc:  # the drain finds the record refused, and quarantines it if it stays refused
                log.warning(
                    "records database refused a batch; it goes to the local spool",
                    extra={"kind": kind, "records": len(bodies), "error": _error(exc)},
                )
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
        telemetry.RECORDS_QUARANTINED.set(self.quarantined)

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
            elif not self._spooled and self._spool is not None:  # entries an operator replayed from the quarantine
                self._spooled = await self._on_disk(self._spool.count)
                if self.quarantined:
                    self._quarantine_is(await self._on_disk(self._spool.quarantine_count))
            if self._spooled and (self.up or await self._ensure_up()):
                try:
                    await self._drain()
                except UNREACHABLE as exc:
                    self._went_down(exc)
                except Exception:  # a bug, or data refused: keep the pump alive, the entries stay spooled
                    log.exception("records spool drain failed", extra={"pending": self._spooled})
            if not self._spooled:
                self._drained.set()

    async def _send(self, spool: Spool, writer: Writer, run: list[Entry]) -> bool:
        """Write `run` in one transaction and remove it from the spool; refused, each entry on its own, so the others
        go in. False when an entry was refused and stays spooled for another try."""
        try:
            await self._write_now(writer, [e.body for e in run])
        except PERMANENT as exc:
            if len(run) == 1:
                return await self._refused(spool, run[0], exc)
            for entry in run:
                try:
                    await self._write_now(writer, [entry.body])
                except PERMANENT as one:
                    if not await self._refused(spool, entry, one):
                        return False
                    continue
                self._refusals.pop(entry.id, None)
                await self._on_disk(spool.remove, [entry.id])
            return True
        for entry in run:
            self._refusals.pop(entry.id, None)
        await self._on_disk(spool.remove, [e.id for e in run])
        return True

    async def _write_now(self, writer: Writer, bodies: list[dict[str, Any]]) -> None:
        async with asyncio.timeout(self.timeout_s), self.pool.connection() as conn:
            await writer(conn, bodies)

    async def _refused(self, spool: Spool, entry: Entry, exc: BaseException) -> bool:
        """Count a refusal of `entry`; at `max_refusals` in a row move it to the quarantine (True: the drain goes
        on). Fewer: False, the entry is tried again on the pump's next round (a constraint being fixed meanwhile)."""
        refusals = self._refusals.get(entry.id, 0) + 1
        fields = {"kind": entry.kind, "spool_id": entry.id, "refusals": refusals, "error": _error(exc)}
        if refusals < self.max_refusals:
            self._refusals[entry.id] = refusals
            log.warning("records database refused a spooled record; it is tried again", extra=fields)
            return False
        self._refusals.pop(entry.id, None)
        await self._on_disk(spool.quarantine, entry.id, _error(exc), refusals)
        self._quarantine_is(await self._on_disk(spool.quarantine_count))
        log.error(
            "record quarantined: the records database keeps refusing it; the spool goes on behind it "
            "(python -m service.records.spool list, show, replay)",
            extra={**fields, "quarantined": self.quarantined, "spool": str(self._spool_path)},
        )
        return True

    def _quarantine_is(self, count: int) -> None:
        if count != self.quarantined:
            self.quarantined = count
            self._set_pending()
            if self.on_quarantine is not None:
                self.on_quarantine(count)

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
                    if not await self._send(spool, writer, run):
                        return  # an entry refused, to be tried again: those behind it wait, in order
                    start = end
                self._spooled = await self._on_disk(spool.count)
                self._set_pending()
            log.info("records spool sent to the database")
        finally:
            spool.unlock()
            self._set_pending()


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:1000]
