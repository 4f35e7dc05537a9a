"""The audit log on PostgreSQL: the same rows and HMAC chain as the SQLite log (`audit.py`, `audit_chain.py`), one
chain for every writer of every replica, and each row carries the call's `trace_id`.

One chain under concurrent writers: a batch is written in one transaction that first takes a transaction-scoped
advisory lock, then reads the head, numbers and chains its rows after it, inserts them and moves the head. Writers
of other replicas wait for the lock (a batch every 50 ms per replica holds it for a few milliseconds), so the chain is
linear whoever writes. A batch may be sent twice (the answer to its COMMIT lost, then sent again from the spool):
every record has a `record_id`, and the rows already in the table are skipped.

As on SQLite, `append` never waits and never drops; `room()` makes a finishing call wait when `queue_size` records
are queued. Redaction and the HMACs run on a worker thread, never on the event loop. While PostgreSQL is away the
batches go to the local spool (`postgres.py`) and are chained when it is back, after the rows written meanwhile by
other replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

import psycopg

from service import redact
from service.records.audit_chain import FIELDS, GENESIS, Keyring, head_mac, row_mac
from service.records.audit_verify import Head, HeadLog, Verdict, walk
from service.records.postgres import Conn, PgRecords, advisory_key
from service.records.rows import AuditRecord, audit_row
from service.redact import Redactor

log = logging.getLogger("service.records.audit")

_BATCH = 500
_CHAIN_LOCK = advisory_key("agent-audit-chain")
_COLUMNS = [*FIELDS, "trace_id", "record_id", "prev_hash", "hash", "key_id"]
_COPY = f"COPY audit ({', '.join(_COLUMNS)}) FROM STDIN"


def pg_text(value: Any) -> Any:
    """PostgreSQL's text refuses NUL, which SQLite keeps: replaced like a lone surrogate (`storable`), so that a tool
    name made up by the model never loses its batch. The JSON columns are escaped already."""
    return value.replace("\x00", "\ufffd") if type(value) is str and "\x00" in value else value


class PgAuditLog:
    """`append(record)` (never waits), `await room()` when `full`, `await flush()`, `await aclose()`."""

    def __init__(
        self,
        records: PgRecords,
        *,
        keyring: Keyring,
        queue_size: int = 10000,
        interval_s: float = 0.05,
        head_log_interval_s: float | None = 300.0,
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.keyring = keyring
        self._records = records.register("audit", self._insert)
        self._redactor = redactor  # None: the process-wide one
        self._pending: deque[AuditRecord] = deque()
        self._max = queue_size
        self._interval = interval_s
        self._head: Head | None = None
        self._heads = HeadLog(head_log_interval_s, clock, store="postgresql")
        self._appended = 0
        self._handled = 0
        self._wake = asyncio.Event()
        self._progress = asyncio.Event()
        self._writer: asyncio.Task[None] | None = None
        self._closing = False
        self._full = False

    @property
    def full(self) -> bool:
        return len(self._pending) >= self._max

    async def room(self) -> None:
        """Wait until the queue is below `queue_size`: the call about to append waits, not the event loop."""
        if not self.full:
            return
        if not self._full:
            log.warning("audit queue full; calls wait for the writer", extra={"queue_size": self._max})
            self._full = True
        self._start()
        self._wake.set()
        while len(self._pending) >= self._max and not self._closing:
            self._progress.clear()
            await self._progress.wait()

    def append(self, record: AuditRecord) -> None:
        self._pending.append(record)
        self._appended += 1
        self._start()
        if self._full and len(self._pending) < self._max // 2:
            self._full = False
        elif len(self._pending) >= self._max:
            self._wake.set()

    async def flush(self) -> None:
        """Wait until everything appended is in PostgreSQL or, while it is away, in the local spool."""
        target = self._appended
        self._start()
        self._wake.set()
        while self._handled < target and self._writer is not None and not self._writer.done():
            self._progress.clear()
            await self._progress.wait()

    async def aclose(self) -> None:
        """Write (or spool) everything appended, log the head, stop the writer. Idempotent."""
        if self._closing:
            return
        self._closing = True
        if self._writer is not None:
            self._wake.set()
            await self._writer
        self._heads.log(self._head, "close")  # the head this writer last saw
        await self._records.release()

    def _start(self) -> None:
        if self._writer is None and not self._closing:
            self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="audit-writer")

    async def _write_loop(self) -> None:
        with contextlib.suppress(Exception):
            async with self._records.connection() as conn:
                self._head = await read_head(conn)
        self._heads.log(self._head, "start")
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval):
                    await self._wake.wait()
            self._wake.clear()
            closing = self._closing  # read before draining: whatever was appended before aclose() is written
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                try:
                    rows = await asyncio.to_thread(self._prepare, batch)
                    await self._records.write("audit", rows)
                except Exception:  # database and spool both failed: keep the writer alive for the next batch
                    log.exception("audit write failed", extra={"records": len(batch)})
                self._handled += len(batch)
                self._progress.set()
            if closing:
                return
            self._heads.moved(self._head)

    def _prepare(self, records: list[AuditRecord]) -> list[dict[str, Any]]:
        redactor = self._redactor or redact.active()
        rows = []
        for r in records:
            row = {name: pg_text(v) for name, v in audit_row(r, redactor).items()}
            row["trace_id"], row["record_id"] = r.trace_id, uuid.uuid4().hex
            rows.append(row)
        return rows

    async def _insert(self, conn: Conn, rows: list[dict[str, Any]]) -> None:
        """Chain `rows` after the head, in one transaction under the chain's lock (see the module docstring)."""
        async with conn.transaction():
            await conn.execute(f"SELECT pg_advisory_xact_lock({_CHAIN_LOCK})")
            cursor = await conn.execute(
                "SELECT record_id FROM audit WHERE record_id = ANY(%s)", ([r["record_id"] for r in rows],)
            )
            written = {r[0] for r in await cursor.fetchall()}
            rows = [r for r in rows if r["record_id"] not in written]
            if not rows:
                return
            head = await read_head(conn)
            values, new_head = await asyncio.to_thread(self._chain, rows, head)
            async with conn.cursor() as cur, cur.copy(_COPY) as copy:
                for value in values:
                    await copy.write_row(value)
            await conn.execute(
                "INSERT INTO audit_head (id, seq, hash, key_id, mac) VALUES (1, %s, %s, %s, %s) "
                "ON CONFLICT (id) DO UPDATE SET seq = EXCLUDED.seq, hash = EXCLUDED.hash, key_id = EXCLUDED.key_id, "
                "mac = EXCLUDED.mac",
                new_head,
            )
        self._head = new_head

    def _chain(self, rows: list[dict[str, Any]], head: Head | None) -> tuple[list[list[Any]], Head]:
        key_id, key = self.keyring.active, self.keyring.key
        seq, prev = (head.seq, head.hash) if head else (0, GENESIS)
        values = []
        for row in rows:
            seq += 1
            row = {**row, "seq": seq, "prev_hash": prev, "key_id": key_id}
            prev = row["hash"] = row_mac(key, key_id, row, prev)
            values.append([row[n] for n in _COLUMNS])
        return values, Head(seq, prev, key_id, head_mac(key, key_id, seq, prev))


async def read_head(conn: Conn) -> Head | None:
    cursor = await conn.execute("SELECT seq, hash, key_id, mac FROM audit_head WHERE id = 1")
    row = await cursor.fetchone()
    return None if row is None else Head(int(row[0]), str(row[1]), row[2], row[3])


# The command line (`python -m service.records.audit … --url postgresql://…`): plain blocking psycopg.

_READ = [*FIELDS, "prev_hash", "hash", "key_id", "trace_id"]


def _snapshot(url: str) -> psycopg.Connection[Any]:
    """A read-only connection whose reads all see one snapshot: the rows and the head agree even while replicas
    write."""
    conn = psycopg.connect(url)
    conn.read_only = True
    conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    return conn


def has_log(url: str) -> bool:
    with psycopg.connect(url) as conn:
        return conn.execute("SELECT to_regclass('audit') IS NOT NULL").fetchone() == (True,)


def verify_pg(url: str, keyring: Keyring, *, anchors: Sequence[tuple[int, str]] = ()) -> Verdict:
    """Walk the chain in PostgreSQL, streamed by a server-side cursor, as `audit_verify.verify` walks a file."""
    with _snapshot(url) as conn, conn.transaction(), conn.cursor(name="audit_walk") as cursor:
        cursor.itersize = 2000
        cursor.execute(f"SELECT {', '.join(_READ)} FROM audit ORDER BY seq")
        rows = (dict(zip(_READ, values, strict=True)) for values in cursor)
        return walk(rows, lambda: _head(conn), keyring, anchors)


def _head(conn: psycopg.Connection[Any]) -> Head | None:
    row = conn.execute("SELECT seq, hash, key_id, mac FROM audit_head WHERE id = 1").fetchone()
    return None if row is None else Head(int(row[0]), str(row[1]), row[2], row[3])


def head_pg(url: str) -> dict[str, Any]:
    with _snapshot(url) as conn:
        head = _head(conn) or Head(0, GENESIS, None, None)
    return {"seq": head.seq, "hash": head.hash, "key_id": head.key_id, "at": time.time()}


def tail_pg(url: str, n: int) -> list[str]:
    names = [*FIELDS, "key_id", "trace_id"]
    with _snapshot(url) as conn:
        rows = conn.execute(f"SELECT {', '.join(names)} FROM audit ORDER BY seq DESC LIMIT %s", (n,)).fetchall()
    out = []
    for values in reversed(rows):
        row = dict(zip(names, values, strict=True))
        row["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["ts"]))
        out.append(json.dumps(row))
    return out
