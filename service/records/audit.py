"""The audit log: every tool call (run id, caller metadata, tool, input, status, duration, result size) appended to
an append-only SQLite table. Each row carries an HMAC-SHA256 over its fields, its key id and the hash of the row before
it (`audit_chain.py`), so `verify` finds an edited, deleted or reordered row, and one rewritten with its chain
recomputed by someone without the key. What this proves and what it does not: docs/audit.md.

    python -m service.records.audit verify [--db PATH | --url URL | --config FILE] [--key-file F] [--anchor SEQ:HASH]
        exit 0 intact, 1 not
    python -m service.records.audit head [--db PATH | --url URL | --config FILE]   the chain's head, to keep elsewhere
    python -m service.records.audit tail [-n N] [--db PATH | --url URL | --config FILE]

(`--url`, or the config's `records.url`: the log in PostgreSQL, `pg_audit.py`.)

Trade-off: the executor must not wait for a disk write on every call, so records go into a bounded in-memory queue
that one writer thread commits in batches every 50 ms (it is the only writer, which keeps the chain linear). A full
queue makes callers wait rather than drop records (see `append`); `close()` commits the queue before returning, so a
clean shutdown loses nothing. A crash (SIGKILL, power cut) loses what was still queued: the last 50 ms of calls. The
writer also logs the chain's head (row and hash) at start, every `head_log_interval_s` when it moved, and at close:
an anchor outside the database.

Input and metadata are redacted (`service/redact.py`) on the writer thread, before the row is signed: the chain covers
the row as stored. Input that cannot be written as JSON (nested too deeply) is recorded as a note saying so, never
lost with its batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from service import redact
from service.records.audit_chain import FIELDS, GENESIS, Keyring, head_mac, load_keyring, row_mac
from service.records.audit_verify import (
    Head,
    HeadLog,
    Verdict,
    add_key_arguments,
    cli_keyring,
    columns,
    parse_anchor,
    read_head,
    verify,
)
from service.records.rows import AuditRecord, audit_row
from service.records.sqlite import add_db_arguments, cli_db_path, cli_records_url, connect, display_url
from service.redact import Redactor

__all__ = ["DEFAULT_FILE", "AuditLog", "AuditRecord", "Verdict", "main", "verify"]

log = logging.getLogger(__name__)

DEFAULT_FILE = "audit.db"
_BATCH = 500
_NAMES = [*FIELDS, "prev_hash", "hash", "key_id"]

# key_id NULL: a row written before keys (unkeyed-legacy), whose `hash` is the plain sha256 of the chain's fields.
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
    hash TEXT NOT NULL,
    key_id TEXT
);
-- The last row's seq and hash, with a MAC over both: deleting the newest rows would otherwise leave a chain that
-- still verifies.
CREATE TABLE IF NOT EXISTS audit_head (
    id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL, key_id TEXT, mac TEXT
);
"""
# Columns that logs written before keys lack, added when such a log is opened.
_ADDED = (("audit", "key_id"), ("audit_head", "key_id"), ("audit_head", "mac"))


class AuditLog:
    """Append with `append(record)` (never waits), after `await room()` when `full`; `flush()` waits until everything
    appended is committed. `keyring` signs the rows (by default `audit.key` beside the database, made if absent)."""

    def __init__(
        self,
        path: Path,
        *,
        keyring: Keyring | None = None,
        queue_size: int = 10000,
        interval_s: float = 0.05,
        head_log_interval_s: float | None = 300.0,
        redactor: Redactor | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.path = path
        self.keyring = load_keyring(None, path) if keyring is None else keyring
        self._redactor = redactor  # None: the process-wide one, looked up per batch
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        self._migrate()
        # A deque, not a queue.Queue: appending takes no lock and wakes no thread, so a call pays well under a
        # microsecond; the writer wakes every `interval_s` (or when told) and commits what has accumulated.
        self._pending: deque[AuditRecord] = deque()
        self._max = queue_size
        self._interval = interval_s
        self._head = read_head(self._conn)
        self._heads = HeadLog(head_log_interval_s, clock, path=str(path))
        self._heads.log(self._head, "start")
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

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)  # closing waits for the writer thread's last batch

    def close(self) -> None:
        """Commit everything appended, log the head, stop the writer. Idempotent."""
        if self._closed:
            return
        self._closed = self._closing = True
        self._wake.set()
        self._writer.join()
        self._conn.close()
        self._heads.log(self._head, "close")

    def _migrate(self) -> None:
        """Give a log written before keys the key columns, and sign its head at once: its rows stay as written
        (unkeyed-legacy), bound from now on by the head's MAC and then by the first keyed row's `prev_hash`."""
        self._conn.execute("BEGIN IMMEDIATE")  # two servers opening one old file: one of them migrates it
        try:
            added = [
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} TEXT")
                for table, column in _ADDED
                if column not in columns(self._conn, table)
            ]
            head = read_head(self._conn)
            if added and head is not None:
                self._write_head(head.seq, head.hash)
                log.warning(
                    "the audit log predates keys: its rows stay unkeyed-legacy (verify names them) and new rows are "
                    "keyed; compare the head logged here with the last one its previous server logged",
                    extra={"path": str(self.path), "audit_seq": head.seq, "key_id": self.keyring.active},
                )
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def _write_head(self, seq: int, row_hash: str) -> Head:
        head = Head(seq, row_hash, self.keyring.active, head_mac(self.keyring.key, self.keyring.active, seq, row_hash))
        self._conn.execute(
            "INSERT OR REPLACE INTO audit_head (id, seq, hash, key_id, mac) VALUES (1, ?, ?, ?, ?)", head
        )
        return head

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
            self._heads.moved(self._head)

    def _commit(self, records: list[AuditRecord]) -> None:
        redactor = self._redactor or redact.active()
        rows = [audit_row(r, redactor) for r in records]
        key_id, key = self.keyring.active, self.keyring.key
        sql = f"INSERT INTO audit ({', '.join(_NAMES)}) VALUES ({', '.join('?' * len(_NAMES))})"
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            # The chain's head is read under the write lock: another process writing to the same file (a second
            # server on the same data_dir) has moved it since our last batch, and our rows must follow its rows.
            head = read_head(self._conn)
            seq, prev = (head.seq, head.hash) if head else (0, GENESIS)
            for row in rows:
                seq += 1
                row["seq"], row["prev_hash"], row["key_id"] = seq, prev, key_id
                prev = row["hash"] = row_mac(key, key_id, row, prev)
            self._conn.executemany(sql, [[row[n] for n in _NAMES] for row in rows])
            written = self._write_head(seq, prev)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        self._head = written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.records.audit", description="Check and read the audit log")
    commands = parser.add_subparsers(dest="command", required=True)
    check = commands.add_parser("verify", help="check the chain and its MACs; exit 1 when it does not hold")
    add_db_arguments(check)
    add_key_arguments(check)
    add_db_arguments(commands.add_parser("head", help="the last row's seq and hash, as JSON: keep it elsewhere"))
    tail = commands.add_parser("tail", help="the last records, one JSON object per line")
    tail.add_argument("-n", type=int, default=20)
    add_db_arguments(tail)
    args = parser.parse_args(argv)
    path = cli_db_path(args, "audit", DEFAULT_FILE)
    url = cli_records_url(args)
    if url is not None:
        return _main_pg(args, url, path)
    if not path.exists():
        print(f"no audit log at {path}", file=sys.stderr)
        return 2
    if args.command == "verify":
        return _verify(args, path, str(path), lambda keyring, anchors: verify(path, keyring, anchors=anchors))
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if args.command == "head":
            head = read_head(conn) or Head(0, GENESIS, None, None)
            print(json.dumps({"seq": head.seq, "hash": head.hash, "key_id": head.key_id, "at": time.time()}))
            return 0
        names = [*FIELDS, "key_id"] if "key_id" in columns(conn, "audit") else list(FIELDS)
        cursor = conn.execute(f"SELECT {', '.join(names)} FROM audit ORDER BY seq DESC LIMIT ?", (args.n,))
        for values in reversed(cursor.fetchall()):
            row = dict(zip(names, values, strict=True))
            row["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row["ts"]))
            print(json.dumps(row))
    finally:
        conn.close()
    return 0


def _main_pg(args: argparse.Namespace, url: str, key_path: Path) -> int:
    """The same commands against PostgreSQL; keys as for the file (`audit.key` beside where it would be)."""
    import psycopg

    from service.records import pg_audit  # psycopg only when asked for

    try:
        if not pg_audit.has_log(url):
            print(f"no audit log in {display_url(url)}", file=sys.stderr)
            return 2
        if args.command == "head":
            print(json.dumps(pg_audit.head_pg(url)))
            return 0
        if args.command == "tail":
            for line in pg_audit.tail_pg(url, args.n):
                print(line)
            return 0
        return _verify(args, key_path, display_url(url), lambda k, anchors: pg_audit.verify_pg(url, k, anchors=anchors))
    except psycopg.OperationalError as exc:
        print(f"cannot read {display_url(url)}: {exc}", file=sys.stderr)
        return 2


def _verify(
    args: argparse.Namespace, key_path: Path, where: str, walk: Callable[[Keyring, list[tuple[int, str]]], Verdict]
) -> int:
    """`verify`'s exit code: 0 when the chain holds, 1 when it does not, 2 when its anchors or keys cannot be used.
    `walk` checks the log (a file's or PostgreSQL's) with the keys and anchors; `where` names it."""
    try:
        anchors = [parse_anchor(a) for a in args.anchor]
        keyring = cli_keyring(args, key_path)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    verdict = walk(keyring, anchors)
    if not verdict.ok:
        print(f"TAMPERED {where}: {verdict.problem} ({verdict.rows} row(s) verified before it)", file=sys.stderr)
        return 1
    print(f"ok {where}: {verdict.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
