"""The run log of the embedded default (`state.url: memory://`): the durable runs' records and events in
data_dir/durable.db beside their checkpoints (`join`; runs.db when it stands alone, as in tests), so that one process
restarted after `kill -9` answers GetRun, WatchRun and CancelRun for them.

Only durable runs are kept here (those that outlive their caller's stream, or ask to be; see `RunRegistry.open`):
the others stay on the in-memory path at its old cost. A run driven here is served from memory as before; the file
is read only for runs this process does not hold (after a restart, or after memory forgot them). It is written by
`sqlite_log.LogWriter` in batches, on one thread that also serves the reads (one connection, so a read sees every
committed round): joined, the checkpoint store's connection and thread, and each checkpoint rides a round.

WAL with `synchronous=NORMAL` (`durable.sqlite_synchronous`), like the checkpoints: a commit survives `kill -9` of
the process, not a power cut. Retention as in memory: an ended run is kept `runs.retention_s`; a run left running
by a dead process `runs.max_run_s` longer. Reads filter by it; expired rows are deleted at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from service import codec
from service import events as ev
from service.control import RunControl, stop_as_marked
from service.durable.batching import Batch
from service.durable.sqlite import SqliteCheckpointStore
from service.errors import StateUnavailable
from service.loop import RunSpec
from service.records.sqlite import connect, transaction
from service.run import Entry, Run, RunRecord, ended_state
from service.state.mirror import MirrorRun
from service.state.sqlite_log import AHEAD, Chunk, LoggedRun, LogWriter

log = logging.getLogger(__name__)

FILE = "runs.db"
SWEEP_S = 60.0
# A process resumes its own durable runs as it starts (`DurableRuns`); a WatchRun that comes in meanwhile waits this
# long after the start for the run to be resumed, and follows it live then, rather than be told to come back.
RESUME_WAIT_S = 5.0
_ENDED = ("succeeded", "failed", "cancelled")
T = TypeVar("T")

_LOG_TABLES = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    idem_key TEXT NOT NULL,
    state TEXT NOT NULL,
    created_ns INTEGER NOT NULL,
    ended_ns INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_expires ON runs (expires);
CREATE INDEX IF NOT EXISTS runs_key ON runs (caller, idem_key) WHERE idem_key <> '';
CREATE TABLE IF NOT EXISTS cancels (  -- a CancelRun of a running durable run: its mode, now or after_turn
    run_id TEXT PRIMARY KEY,
    mode TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    run_id TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    first_seq INTEGER NOT NULL,
    times TEXT NOT NULL,  -- the events' time_ns, comma-separated
    events BLOB NOT NULL,  -- codec.dumps_packed: a JSON array of the events first_seq..last_seq
    PRIMARY KEY (run_id, last_seq)
) WITHOUT ROWID;
"""
_SCHEMA = _LOG_TABLES + "PRAGMA user_version = 1;\n"


class SqliteRunLog:
    def __init__(
        self,
        path: Path,
        *,
        retention_s: float,
        max_run_s: float,
        synchronous: str = "NORMAL",
        clock: Callable[[], float] = time.time,
        resume_wait_s: float = RESUME_WAIT_S,
    ) -> None:
        """`clock`: wall time, for retention that outlives the process."""
        self.resume_wait_s = resume_wait_s
        self.path = path
        self.retention_s = retention_s
        self.live_s = max_run_s + retention_s
        self.clock = clock
        self._synchronous = synchronous
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="run-log")
        self._db: sqlite3.Connection | None = None
        self._swept = 0.0
        self.writer = LogWriter(self._write)
        self._born = time.monotonic()
        self._resumed: dict[str, Run] = {}  # runs revived in this process, by id, until they end
        # durable SubmitRun runs wait in the checkpoint store's queue (`durable.queue: store`), not in the process:
        # a run logged as queued is then one that the queue hands to this process later, not one lost with it
        self.store_queue = False
        self._revival = asyncio.Event()
        self._joined: SqliteCheckpointStore | None = None
        self._closed = False

    def join(self, store: SqliteCheckpointStore) -> None:
        """Keep the log's tables in the checkpoint store's file, on its connection and thread (before either is
        used): a checkpoint then commits in the log's next round, with the run's events before it, in one
        transaction (measured: one commit and one thread hop per checkpoint, where a flush and the checkpoint took
        two each). A runs.db left by an earlier version is copied in at the first open."""
        self._joined = store
        self._thread = store._thread
        store.rider = self._ride

    async def _ride(self, batch: Batch) -> None:
        assert self._joined is not None
        if self._closed:  # at shutdown, after the log: the store's own transaction
            await self._on_thread(self._joined._write_sync, batch)
        else:
            await self.writer.ride(batch)

    # --- what the registry asks --------------------------------------------------------------------------------------

    def new_run(
        self,
        spec: RunSpec,
        control: RunControl,
        *,
        caller: str,
        key: str,
        fingerprint: str,
        history: Sequence[Entry] = (),
    ) -> Run:
        """A durable run to drive here, its log kept on disk as it grows; `history`: the entries a previous process
        logged for it (a run resumed after a restart goes on from there, with the next seq)."""
        run = LoggedRun(
            spec,
            control,
            caller=caller,
            key=key,
            fingerprint=fingerprint,
            shipped=self.writer.note,
            history=history,
            flush=self.writer.flush,
        )
        if history:
            self.writer.resumed(run)
        return run

    async def flush(self, run: Run) -> None:
        """Return once every event `run` has logged so far is committed (before a checkpoint: see sqlite_log)."""
        await self.writer.flush(run)

    async def record(self, run_id: str) -> RunRecord | None:
        return await self._on_thread(self._record, run_id)

    async def keyed(self, caller: str, key: str) -> str | None:
        """The run `caller` started with idempotency key `key`, if the log still keeps it: after a restart the
        registry's memory has only the runs it resumed, and a retry of one that had ended must find it, not run it
        again (an outside finding: the retry re-ran every tool call, unsafe ones included)."""
        return await self._on_thread(self._keyed, caller, key)

    async def history(self, run_id: str) -> tuple[RunRecord, list[Entry]] | None:
        """A run's record and all its entries, in seq order (to resume it, or to serve it)."""
        record = await self.record(run_id)
        if record is None:
            return None
        return record, await self._on_thread(self._entries, run_id, record.last_seq)

    async def revive(self, spec: RunSpec, control: RunControl, *, caller: str) -> Run | str:
        """A durable run claimed after a restart (`DurableRuns`), its log holding what the last process kept of it
        (empty when nothing was); or its final state when its closing event was kept (its end not yet recorded)."""
        found = await self.history(spec.run_id)
        if found is not None and found[0].finished:
            return found[0].state
        fingerprint, entries = ("", []) if found is None else (found[0].fingerprint, found[1])
        # its idempotency key too: the same key sent after the restart attaches to it (RunRegistry.find)
        key = "" if found is None else await self._on_thread(self._key, spec.run_id)
        run = self.new_run(spec, control, caller=caller, key=key, fingerprint=fingerprint, history=entries)
        # a CancelRun acknowledged before the crash is applied here (an outside finding: an AFTER_TURN one was
        # lost, and the run went on to its end after the restart)
        stop_as_marked(control, await self._on_thread(self._cancel_mark, spec.run_id))
        self._resumed = {run_id: r for run_id, r in self._resumed.items() if not r.finished}
        self._resumed[run.id] = run
        self._revival.set()
        self._revival = asyncio.Event()
        return run

    async def mark_cancel(self, run_id: str, *, after_turn: bool) -> None:
        await self._on_thread(self._mark_cancel, run_id, "after_turn" if after_turn else "now")

    async def flushed(self, within_s: float) -> bool:
        """Wait (up to `within_s`) until every event noted so far is committed; False when it is not."""
        return await self.writer.idle(within_s)

    async def mirror(self, record: RunRecord) -> Run:
        """The run as its log holds it; the live run itself if it was resumed here (or is, soon after the start).
        One that no process drives any more (it was running when its process stopped and has not been resumed) ends
        its followers' streams, once they have read the log, with UNAVAILABLE: they watch again once it is."""
        if not record.finished:
            # a run waiting in the durable queue (durable.queue: store) is followed from its claim, however late
            queued = self.store_queue and record.state == "queued"
            resumed = await self._resumed_soon(record.run_id, forever=queued)
            if resumed is not None:
                return resumed
        mirror = MirrorRun(record)
        mirror.ahead = AHEAD  # its driver's streams went ahead of this log: a WatchRun may start before a recovery
        mirror.extend(await self._on_thread(self._entries, record.run_id, record.last_seq), ended_ns=record.ended_ns)
        if not mirror.finished:
            mirror.give_up(_not_driven(record))
        return mirror

    async def _resumed_soon(self, run_id: str, *, forever: bool = False) -> Run | None:
        while (run := self._resumed.get(run_id)) is None:
            if forever:
                await self._revival.wait()
                continue
            left = self._born + self.resume_wait_s - time.monotonic()
            if left <= 0:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._revival.wait(), left)
        return run

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        """A run this process does not hold: ended (the registry answers that) or waiting to be resumed."""
        raise _not_driven(record)

    async def close(self) -> None:
        await self.writer.close()
        self._closed = True
        if self._joined is not None:
            return  # the connection and the thread are the checkpoint store's: it closes them
        if self._db is not None:
            await self._on_thread(self._db.close)
            self._db = None
        self._thread.shutdown(wait=True)

    # --- on the log's thread -------------------------------------------------------------------------------------

    async def _on_thread(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._thread, fn, *args)

    async def _write(self, chunks: list[Chunk], riders: list[Batch]) -> None:
        await self._on_thread(self._write_sync, chunks, riders)

    def _open(self, create: bool) -> sqlite3.Connection | None:
        if self._joined is not None:
            if self._db is None and self._joined._db is not None:
                db = self._joined._db
                db.executescript(_LOG_TABLES)
                _copy_earlier(db, self.path)
                self._db = db
            return self._db
        if self._db is None and (create or self.path.exists()):
            db = connect(self.path)
            db.execute(f"PRAGMA synchronous={self._synchronous}")
            db.executescript(_SCHEMA)
            self._db = db
        return self._db

    def _write_sync(self, chunks: list[Chunk], riders: Sequence[Batch] = ()) -> None:
        now = self.clock()
        if not chunks and not riders:  # the writer's idle round
            db = self._open(create=False)
            if db is not None and now - self._swept > SWEEP_S:
                with transaction(db):
                    self._sweep(db, now)
            return
        db = self._open(create=True)
        assert db is not None
        with transaction(db):
            for batch in riders:  # after the events of this round, in the same transaction: never ahead of them
                assert self._joined is not None
                self._joined.write_in(db, batch)
            db.executemany(
                "INSERT INTO runs (run_id, caller, fingerprint, idem_key, state, created_ns, ended_ns, last_seq, "
                "expires) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "state = excluded.state, ended_ns = excluded.ended_ns, last_seq = excluded.last_seq, "
                "expires = excluded.expires",
                [
                    (
                        *c[:8],
                        now + (self.retention_s if c.state in _ENDED else self.live_s),
                    )
                    for c in chunks
                ],
            )
            # one row per run and round, as the Redis shipper's one stream entry: a row and an encoder call per event
            # cost a third more CPU per event (measured: +21 against +14 µs)
            db.executemany(
                "INSERT OR IGNORE INTO events (run_id, last_seq, first_seq, times, events) VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        c.run_id,
                        c.last_seq,
                        c.entries[0].seq,
                        ",".join([str(e.time_ns) for e in c.entries]),
                        codec.dumps_packed([e.event for e in c.entries]),
                    )
                    for c in chunks
                    if c.entries
                ],
            )
            if now - self._swept > SWEEP_S:
                self._sweep(db, now)

    def _sweep(self, db: sqlite3.Connection, now: float) -> None:
        """Delete the runs whose retention has passed, with their events and cancels (in the caller's transaction)."""
        self._swept = now
        db.execute("DELETE FROM events WHERE run_id IN (SELECT run_id FROM runs WHERE expires < ?)", (now,))
        db.execute("DELETE FROM cancels WHERE run_id IN (SELECT run_id FROM runs WHERE expires < ?)", (now,))
        db.execute("DELETE FROM runs WHERE expires < ?", (now,))

    def _record(self, run_id: str) -> RunRecord | None:
        db = self._open(create=False)
        if db is None:
            return None
        row = db.execute(
            "SELECT caller, state, last_seq, created_ns, ended_ns, fingerprint FROM runs "
            "WHERE run_id = ? AND expires >= ?",
            (run_id, self.clock()),
        ).fetchone()
        if row is None:
            return None
        caller, state, last_seq, created_ns, ended_ns, fingerprint = row
        outcome = None
        if last_seq:
            last = db.execute(
                "SELECT times, events FROM events WHERE run_id = ? AND last_seq = ?", (run_id, last_seq)
            ).fetchone()
            event = codec.loads_packed(last[1])[-1] if last else None
            outcome = event if isinstance(event, ev.FinalResponse | ev.RunFailed) else None
            if outcome is not None and state not in _ENDED:
                # its closing event is kept but its row was written before it ended (the process was killed in
                # between): it ended as that event says (an outside finding: a queued run cancelled just before a
                # kill -9 read QUEUED for good, its log ending with its cancellation)
                state = ended_state(outcome)
                ended_ns = ended_ns or int(last[0].rsplit(",", 1)[-1])
        return RunRecord(run_id, caller, state, last_seq, created_ns, ended_ns, outcome, fingerprint)

    def _mark_cancel(self, run_id: str, mode: str) -> None:
        db = self._open(create=True)
        assert db is not None
        with transaction(db):
            db.execute(
                "INSERT INTO cancels (run_id, mode) VALUES (?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "mode = CASE WHEN cancels.mode = 'now' THEN 'now' ELSE excluded.mode END",
                (run_id, mode),
            )

    def _cancel_mark(self, run_id: str) -> str | None:
        db = self._open(create=False)
        row = None if db is None else db.execute("SELECT mode FROM cancels WHERE run_id = ?", (run_id,)).fetchone()
        return None if row is None else str(row[0])

    def _keyed(self, caller: str, key: str) -> str | None:
        db = self._open(create=False)
        row = (
            None
            if db is None
            else db.execute(
                "SELECT run_id FROM runs WHERE caller = ? AND idem_key = ? AND expires >= ? "
                "ORDER BY created_ns DESC LIMIT 1",
                (caller, key, self.clock()),
            ).fetchone()
        )
        return None if row is None else str(row[0])

    def _key(self, run_id: str) -> str:
        db = self._open(create=False)
        row = None if db is None else db.execute("SELECT idem_key FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return "" if row is None else str(row[0])

    def _entries(self, run_id: str, last_seq: int) -> list[Entry]:
        db = self._open(create=False)
        if db is None:
            return []
        rows = db.execute(
            "SELECT first_seq, times, events FROM events WHERE run_id = ? AND last_seq <= ? ORDER BY last_seq",
            (run_id, last_seq),
        ).fetchall()
        entries = []
        for first, times, events in rows:
            for seq, (time_ns, event) in enumerate(
                zip(times.split(","), codec.loads_packed(events), strict=True), first
            ):
                entries.append(Entry(seq, int(time_ns), event))
        return entries


def _copy_earlier(db: sqlite3.Connection, path: Path) -> None:
    """Copy the rows of a runs.db an earlier version kept apart into this file (once: it is renamed after)."""
    if not path.exists():
        return
    try:
        db.execute("ATTACH DATABASE ? AS earlier", (str(path),))
        try:
            with transaction(db):
                db.execute("INSERT OR IGNORE INTO main.runs SELECT * FROM earlier.runs")
                db.execute("INSERT OR IGNORE INTO main.events SELECT * FROM earlier.events")
        finally:
            db.execute("DETACH DATABASE earlier")
        path.rename(path.with_name(path.name + ".copied"))
    except (OSError, sqlite3.Error):  # another worker on this data_dir copied it first
        log.warning("the run log of an earlier version was not copied", extra={"from": str(path)}, exc_info=True)
        return
    log.info("the run log of an earlier version was copied in", extra={"from": str(path)})


def _not_driven(record: RunRecord) -> StateUnavailable:
    return StateUnavailable(
        f"run {record.run_id} is not driven by any process now: it was {record.state} when its process stopped and "
        f"has not been resumed yet; its events 1..{record.last_seq} are kept: retry (WatchRun from after_seq) shortly"
    )
