"""The checkpoint store of one node (no `records.url`): a SQLite file under data_dir in WAL mode, written by one thread
of its own in batches (batching.py). `synchronous=NORMAL` by default: a commit survives `kill -9` of the process, not
a power cut (`durable.sqlite_synchronous: FULL` for that, at the price of an fsync per batch).

The durable queue (base.DurableQueue) with `durable.queue: store`: queued runs are rows in state "queued", oldest
first by rowid; every statement runs on the store's one thread, and claims in a BEGIN IMMEDIATE transaction (the
file's write lock: a second process on the same file, which only a misconfiguration makes, still claims each run
once). Wake-ups are the in-process event `queue_wake`.

One node means no dead peers to detect: at `open` the process finds its own running runs left from before a restart
(same executor id) and `recover` hands them over, with any run released at a drain. A lock file per executor id
keeps a second live process with the same id (a copy of the same data_dir) from driving the same runs.

The run log of one node keeps its tables in this file too (`SqliteRunLog.join`): a batch then commits in the log's
round, one transaction with the events before its steps (`rider`, `write_in`).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar, cast

from service.durable.base import DurableRun, ExecutorIdInUse, Step, StepKind
from service.durable.batching import FORMAT, PRUNE_BATCH, Batch, BatchingStore, decode, encode
from service.records.sqlite import connect

DEFAULT_FILE = "durable.db"
T = TypeVar("T")

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS durable_runs (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    state TEXT NOT NULL,
    caller TEXT NOT NULL,
    background INTEGER NOT NULL,
    request TEXT NOT NULL,
    format INTEGER NOT NULL DEFAULT {FORMAT},
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS durable_runs_running ON durable_runs (owner) WHERE state = 'running';
CREATE INDEX IF NOT EXISTS durable_runs_queued ON durable_runs (state) WHERE state = 'queued';
CREATE INDEX IF NOT EXISTS durable_runs_ended ON durable_runs (updated) WHERE state NOT IN ('running', 'queued');
CREATE TABLE IF NOT EXISTS run_steps (
    run_id TEXT NOT NULL,
    step_no INTEGER NOT NULL,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    value TEXT NOT NULL,
    format INTEGER NOT NULL DEFAULT {FORMAT},
    PRIMARY KEY (run_id, step_no)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


class SqliteCheckpointStore(BatchingStore):
    def __init__(
        self,
        path: Path,
        owner: str,
        *,
        synchronous: str = "NORMAL",
        recover_interval_s: float = 1.0,
        keep_ended_s: float | None = None,
    ) -> None:
        super().__init__(owner, recover_interval_s=recover_interval_s, keep_ended_s=keep_ended_s)
        self.path = path
        self._synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="durable-sqlite")
        self._db: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # set by the one node's run log when it keeps its tables in this file (`SqliteRunLog.join`): each batch
        # then rides the log's next round, one transaction with the events before it (no flush of their own first)
        self.rider: Callable[[Batch], Awaitable[None]] | None = None
        self.queue_wake = asyncio.Event()

    async def open(self) -> None:
        await self._on_thread(self._open)
        self._start_writer()

    async def aclose(self) -> None:
        await self._stop_writer()
        if self._db is not None:
            await self._on_thread(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = None

    async def load(self, run_id: str) -> DurableRun | None:
        return await self._on_thread(self._load, run_id)

    async def prune(self, before: float) -> int:
        return await self._on_thread(self._prune_sync, before)

    # --- the durable queue ---------------------------------------------------------------------------------------

    async def enqueue(self, run: DurableRun, *, limit: int) -> bool:
        return await self._on_thread(self._enqueue_sync, run, limit)

    async def queued(self) -> int:
        return await self._on_thread(self._count_sync)

    async def claim_queued(self, count: int, *, max_running: int | None = None) -> list[DurableRun]:
        claimed = await self._on_thread(self._claim_queued_sync, count, max_running)
        self._driving.update(r.run_id for r in claimed)
        return claimed

    async def queue_position(self, run_id: str) -> int:
        return await self._on_thread(self._position_sync, run_id)

    async def cancel_queued(self, run_id: str) -> bool:
        return await self._on_thread(self._cancel_queued_sync, run_id)

    # --- on the store's thread -----------------------------------------------------------------------------------

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    def _open(self) -> None:
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f"{self.path.name}.{self.owner}.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ExecutorIdInUse(f"executor id {self.owner!r} is held by a live process on {self.path}") from None
        self._lock_fd = fd
        db = connect(self.path)
        db.execute(f"PRAGMA synchronous={self._synchronous}")
        db.executescript(_SCHEMA)
        self._db = db
        rows = db.execute(
            "SELECT run_id FROM durable_runs WHERE state = 'running' AND owner = ? ORDER BY created", (self.owner,)
        ).fetchall()
        self._leftovers = [r[0] for r in rows]

    def _write_sync(self, batch: Batch) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            self.write_in(db, batch)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def write_in(self, db: sqlite3.Connection, batch: Batch) -> None:
        """The batch's rows, inside a write transaction the caller holds (on this store's thread)."""
        now = time.time()
        db.executemany(
            "INSERT OR IGNORE INTO durable_runs (run_id, owner, state, caller, background, request, created, "
            "updated) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (r.run_id, self.owner, r.state, r.caller, r.background, encode(r.request), now, now)
                for r in batch.begins
            ],
        )
        fenced = sorted(set(batch.fenced))
        if fenced:  # the write lock is held: nobody claims between this look and the writes
            marks = ",".join("?" * len(fenced))
            rows = db.execute(
                f"SELECT run_id FROM durable_runs WHERE owner = ? AND run_id IN ({marks})", (self.owner, *fenced)
            ).fetchall()
            batch.owned = {r[0] for r in rows}
        db.executemany(
            "INSERT OR IGNORE INTO run_steps (run_id, step_no, kind, key, seq, value) VALUES (?, ?, ?, ?, ?, ?)",
            [
                (s.run_id, s.step_no, s.kind, s.key, s.seq, encode(s.value))
                for s in batch.steps
                if s.run_id in batch.owned
            ],
        )
        db.executemany(
            "UPDATE durable_runs SET state = ?, updated = ? WHERE run_id = ?",
            [(state, now, run_id) for run_id, state in batch.ends if run_id in batch.owned],
        )
        db.executemany(
            "UPDATE durable_runs SET owner = '', updated = ? WHERE run_id = ? AND owner = ? AND state = 'running'",
            [(now, run_id, self.owner) for run_id in batch.releases],
        )

    def _claim_sync(self, leftovers: list[str], skip: list[str]) -> list[str]:
        db = self._db
        assert db is not None
        db.execute("BEGIN IMMEDIATE")
        try:
            marks = ",".join("?" * len(skip))
            released = [
                r[0]
                for r in db.execute(
                    f"UPDATE durable_runs SET owner = ?, updated = ? "
                    f"WHERE state = 'running' AND owner = '' AND run_id NOT IN ({marks}) RETURNING run_id",
                    (self.owner, time.time(), *skip),
                ).fetchall()
            ]
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        return leftovers + released

    def _enqueue_sync(self, run: DurableRun, limit: int) -> bool:
        db = self._db
        assert db is not None
        with _immediate(db):
            if self._count_sync() >= limit:
                return False
            now = time.time()
            cursor = db.execute(
                "INSERT OR IGNORE INTO durable_runs (run_id, owner, state, caller, background, request, created, "
                "updated) VALUES (?, '', 'queued', ?, 1, ?, ?, ?)",
                (run.run_id, run.caller, encode(run.request), now, now),
            )
            return cursor.rowcount == 1

    def _count_sync(self) -> int:
        assert self._db is not None
        return int(self._db.execute("SELECT count(*) FROM durable_runs WHERE state = 'queued'").fetchone()[0])

    def _claim_queued_sync(self, count: int, max_running: int | None) -> list[DurableRun]:
        db = self._db
        assert db is not None
        with _immediate(db):
            if max_running is not None:
                running = db.execute("SELECT count(*) FROM durable_runs WHERE state = 'running' AND background")
                count = min(count, max_running - int(running.fetchone()[0]))
            if count <= 0:
                return []
            rows = db.execute(
                "SELECT run_id, caller, background, request, format FROM durable_runs WHERE state = 'queued' "
                "ORDER BY rowid LIMIT ?",
                (count,),
            ).fetchall()
            db.executemany(
                "UPDATE durable_runs SET owner = ?, state = 'running', updated = ? WHERE run_id = ?",
                [(self.owner, time.time(), r[0]) for r in rows],
            )
        return [
            DurableRun(
                run_id=r[0],
                caller=r[1],
                owner=self.owner,
                state="running",
                background=bool(r[2]),
                request=decode(r[3], r[4]),
            )
            for r in rows
        ]

    def _position_sync(self, run_id: str) -> int:
        assert self._db is not None
        row = self._db.execute(
            "SELECT count(*) FROM durable_runs WHERE state = 'queued' "
            "AND rowid <= (SELECT rowid FROM durable_runs WHERE run_id = ? AND state = 'queued')",
            (run_id,),
        ).fetchone()
        return int(row[0])

    def _cancel_queued_sync(self, run_id: str) -> bool:
        assert self._db is not None
        with _immediate(self._db):
            cursor = self._db.execute(
                "UPDATE durable_runs SET state = 'cancelled', updated = ? WHERE run_id = ? AND state = 'queued'",
                (time.time(), run_id),
            )
            return cursor.rowcount == 1

    def _prune_sync(self, before: float) -> int:
        db = self._db
        assert db is not None
        with _immediate(db):
            gone = [
                r[0]
                for r in db.execute(
                    "SELECT run_id FROM durable_runs WHERE state NOT IN ('running', 'queued') AND updated < ? "
                    "ORDER BY updated LIMIT ?",
                    (before, PRUNE_BATCH),
                ).fetchall()
            ]
            db.executemany("DELETE FROM run_steps WHERE run_id = ?", [(r,) for r in gone])
            db.executemany("DELETE FROM durable_runs WHERE run_id = ?", [(r,) for r in gone])
        return len(gone)

    def _load(self, run_id: str) -> DurableRun | None:
        db = self._db
        assert db is not None
        row = db.execute(
            "SELECT owner, state, caller, background, request, format, created FROM durable_runs WHERE run_id = ?",
            (run_id,),
        ).fetchone()
        if row is None:
            return None
        steps = db.execute(
            "SELECT step_no, kind, key, seq, value, format FROM run_steps WHERE run_id = ? ORDER BY step_no", (run_id,)
        ).fetchall()
        return DurableRun(
            run_id=run_id,
            owner=row[0],
            state=row[1],
            caller=row[2],
            background=bool(row[3]),
            request=decode(row[4], row[5]),
            created=row[6],
            steps=[
                Step(run_id=run_id, step_no=n, kind=cast(StepKind, kind), key=key, seq=seq, value=decode(value, fmt))
                for n, kind, key, seq, value, fmt in steps
            ],
        )

    # --- the backend's part of BatchingStore ----------------------------------------------------------------------

    async def _write(self, batch: Batch) -> None:
        if self.rider is not None:
            await self.rider(batch)
        else:
            await self._on_thread(self._write_sync, batch)
        if batch.releases:
            self._wake.set()

    async def _claim(self) -> list[str]:
        leftovers, self._leftovers = self._leftovers, []
        return await self._on_thread(self._claim_sync, leftovers, self._not_mine())


@contextlib.contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the file's write lock at its start (BEGIN IMMEDIATE): what it read is what it
    changes."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
