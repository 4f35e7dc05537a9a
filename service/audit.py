"""The audit log: every tool call (run id, caller metadata, tool, input, status, duration, result size) appended to
an append-only SQLite table where each row carries the hash of the one before, so `verify` finds any edited or
deleted row.

    python -m service.audit verify [--db PATH | --config FILE]     exit 0: intact; 1: tampered (says which row)
    python -m service.audit tail [-n N] [--db PATH | --config FILE]

Trade-off: the executor must not wait for a disk write on every call, so records go into a bounded in-memory queue
that one writer thread commits in batches every 50 ms (it is the only writer, which keeps the chain linear). A full
queue makes callers wait rather than drop records (see `append`); `close()` commits the queue before returning, so a
clean shutdown loses nothing. A crash (SIGKILL, power cut) loses what was still queued: the last 50 ms of calls.

Input and metadata are redacted (`service/redact.py`) on the writer thread, before the row is hashed: the chain covers
the row as stored. Input that cannot be written as JSON (nested too deeply) is recorded as a note saying so, never
lost with its batch.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sqlite3
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service import redact
from service.redact import Redactor, safe_json
from service.store import add_db_arguments, cli_db_path, connect, storable

log = logging.getLogger(__name__)

DEFAULT_FILE = "audit.db"
GENESIS = "0" * 64
_BATCH = 500
_COLUMNS = [
    "seq",
    "ts",
    "run_id",
    "metadata",
    "tool",
    "call_id",
    "input",
    "status",
    "duration_s",
    "result_bytes",
    "attempts",
    "cache_hit",
    "answered_by",
    "prev_hash",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    run_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    tool TEXT NOT NULL,
    call_id TEXT NOT NULL,
    input TEXT NOT NULL,
    status TEXT NOT NULL,
    duration_s REAL NOT NULL,
    result_bytes INTEGER NOT NULL,
    attempts INTEGER NOT NULL,
    cache_hit INTEGER NOT NULL,
    answered_by TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
-- The last row's seq and hash: deleting the newest rows would otherwise leave a chain that still verifies.
CREATE TABLE IF NOT EXISTS audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
"""


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One tool call as the executor saw it. `data` is the JSON result; its size is measured on the writer thread."""

    ts: float
    run_id: str
    metadata: dict[str, str]
    tool: str
    call_id: str
    input: Any
    status: str
    duration_s: float
    attempts: int
    cache_hit: bool
    answered_by: str
    data: Any = None
    error: str = ""


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def row_hash(row: dict[str, Any]) -> str:
    """sha256 over the canonical JSON of the row's columns (prev_hash included), which chains each row to the last."""
    return hashlib.sha256(_canonical({c: row[c] for c in _COLUMNS}).encode()).hexdigest()


class AuditLog:
    """Append with `append(record)` (never waits), after `await room()` when `full`; `flush()` waits until everything
    appended is committed."""

    def __init__(
        self, path: Path, *, queue_size: int = 10000, interval_s: float = 0.05, redactor: Redactor | None = None
    ) -> None:
        self.path = path
        self._redactor = redactor  # None: the process-wide one, looked up per batch
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        # A deque, not a queue.Queue: appending takes no lock and wakes no thread, so a call pays well under a
        # microsecond; the writer wakes every `interval_s` (or when told) and commits what has accumulated.
        self._pending: deque[AuditRecord] = deque()
        self._max = queue_size
        self._interval = interval_s
        self._appended = 0
        self._handled = 0
        self._wake = threading.Event()
        self._closing = False
        self._closed = False
        self._full = False
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    @property
    def full(self) -> bool:
        return len(self._pending) >= self._max

    async def room(self) -> None:
        """Wait until the queue is below `queue_size`: the writer is behind. The call about to append waits for it,
        not the event loop (a stall of the loop would stop every run), and nothing is dropped: a hole in the record
        is worse than a slow call."""
        if not self.full:
            return
        if not self._full:
            log.warning("audit queue full; calls wait for the writer", extra={"queue_size": self._max})
            self._full = True
        self._wake.set()
        # Polling: the writer is a plain thread, and this runs only while the queue is full.
        while len(self._pending) >= self._max and self._writer.is_alive():  # noqa: ASYNC110
            await asyncio.sleep(0.001)

    def append(self, record: AuditRecord) -> None:
        """Queue `record`; never waits, never drops. `queue_size` is kept by callers awaiting `room()` first; a
        record appended past it (a cancelled call's, which cannot wait) is kept as well."""
        self._pending.append(record)
        self._appended += 1
        if self._full and len(self._pending) < self._max // 2:
            self._full = False
        elif len(self._pending) >= self._max:
            self._wake.set()

    async def flush(self) -> None:
        target = self._appended
        self._wake.set()
        # Polling, not an asyncio.Event: the writer is a plain thread, and flush() is for tests and shutdown only.
        while self._handled < target and self._writer.is_alive():  # noqa: ASYNC110
            await asyncio.sleep(0.002)

    def close(self) -> None:
        """Commit everything appended, stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._wake.set()
        self._writer.join()
        self._conn.close()

    def _write_loop(self) -> None:
        while True:
            self._wake.wait(self._interval)
            self._wake.clear()
            closing = self._closing  # read before draining: whatever was appended before close() is written
            while self._pending:
                batch = [self._pending.popleft() for _ in range(min(_BATCH, len(self._pending)))]
                try:
                    self._commit(batch)
                except Exception:  # keep the writer alive: a dead writer would stall every later call
                    log.exception("audit write failed", extra={"records": len(batch)})
                self._handled += len(batch)
            if closing:
                return

    def _commit(self, records: list[AuditRecord]) -> None:
        redactor = self._redactor or redact.active()
        rows = []
        for r in records:
            size = len(safe_json(r.data)) if r.status in ("ok", "partial") else len(storable(r.error).encode())
            rows.append(
                {  # JSON columns are ASCII (safe_json escapes); text from the model goes through storable()
                    "ts": r.ts,
                    "run_id": storable(r.run_id),
                    "metadata": safe_json(redactor.value(dict(r.metadata))),
                    "tool": storable(r.tool),
                    "call_id": storable(r.call_id),
                    "input": safe_json(redactor.value(r.input)),
                    "status": r.status,
                    "duration_s": r.duration_s,
                    "result_bytes": size,
                    "attempts": r.attempts,
                    "cache_hit": int(r.cache_hit),
                    "answered_by": storable(r.answered_by),
                }
            )
        names = [*_COLUMNS, "hash"]
        sql = f"INSERT INTO audit ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})"
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # The chain's head is read under the write lock: another process writing to the same file (a second
            # server on the same data_dir) has moved it since our last batch, and our rows must follow its rows.
            head = self._conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            seq, prev = (int(head[0]), str(head[1])) if head else (0, GENESIS)
            for row in rows:
                seq += 1
                row["seq"], row["prev_hash"] = seq, prev
                prev = row["hash"] = row_hash(row)
            self._conn.executemany(sql, [[row[n] for n in names] for row in rows])
            self._conn.execute("INSERT OR REPLACE INTO audit_head (id, seq, hash) VALUES (1, ?, ?)", (seq, prev))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    rows: int
    problem: str = ""


def verify(path: Path) -> Verdict:
    """Walk the chain: each row's hash recomputed, each prev_hash the hash before it, seq without gaps, and the
    head row naming the last row (so deleting the newest rows is caught too)."""
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        cursor = conn.execute(f"SELECT {', '.join(_COLUMNS)}, hash FROM audit ORDER BY seq")
        expected_seq, prev, count = 1, GENESIS, 0
        for values in cursor:
            row = dict(zip([*_COLUMNS, "hash"], values, strict=True))
            seq = row["seq"]
            if seq != expected_seq:
                return Verdict(False, count, f"row {expected_seq} is missing (found row {seq} next)")
            if row["prev_hash"] != prev:
                return Verdict(False, count, f"row {seq}: prev_hash does not match row {seq - 1}'s hash")
            if row_hash(row) != row["hash"]:
                return Verdict(False, count, f"row {seq} was modified: its content does not match its hash")
            prev, expected_seq, count = row["hash"], seq + 1, count + 1
        head = conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        head_seq, head_hash = (head[0], head[1]) if head else (0, GENESIS)
        if (head_seq, head_hash) != (count, prev):
            return Verdict(False, count, f"rows after {count} are missing: the log's head is row {head_seq}")
        return Verdict(True, count)
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.audit", description="Check and read the audit log")
    commands = parser.add_subparsers(dest="command", required=True)
    add_db_arguments(commands.add_parser("verify", help="check the hash chain; exit 1 when tampered"))
    tail = commands.add_parser("tail", help="the last records, one JSON object per line")
    tail.add_argument("-n", type=int, default=20)
    add_db_arguments(tail)
    args = parser.parse_args(argv)
    path = cli_db_path(args, "audit", DEFAULT_FILE)
    if not path.exists():
        print(f"no audit log at {path}", file=sys.stderr)
        return 2
    if args.command == "verify":
        verdict = verify(path)
        if not verdict.ok:
            print(f"TAMPERED {path}: {verdict.problem} ({verdict.rows} row(s) verified before it)", file=sys.stderr)
            return 1
        print(f"ok {path}: {verdict.rows} row(s), hash chain intact")
        return 0
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        cursor = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM audit ORDER BY seq DESC LIMIT ?", (args.n,))
        for values in reversed(cursor.fetchall()):
            row = dict(zip(_COLUMNS, values, strict=True))
            row["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["ts"]))
            print(json.dumps(row))
    finally:
        conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
