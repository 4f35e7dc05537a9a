"""Run summaries: what `GetRun` answers for a run after the live state forgot it (Redis keeps a run's events for
`runs.retention_s`; the records database keeps its summary for as long as records are kept). Written once, when a
run ends, by the replica that drove it.

`RunSummaryStore` is the interface; `SqliteRunSummaryStore` (here, `<data_dir>/summaries.db`) and
`PgRunSummaryStore` (`pg_summaries.py`) implement it. The outcome event is kept as `service/codec.py` JSON.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from service import codec
from service import events as ev
from service.records.sqlite import connect, storable

if TYPE_CHECKING:
    from service.listing import RunQuery
    from service.run import Run, RunRecord

log = logging.getLogger(__name__)

DEFAULT_FILE = "summaries.db"
COLUMNS = ("run_id", "caller", "state", "last_seq", "created_ns", "ended_ns", "outcome", "trace_id")


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary:
    run_id: str
    caller: str
    state: str  # a RunState value: succeeded, failed, cancelled
    last_seq: int
    created_ns: int
    ended_ns: int
    outcome: ev.FinalResponse | ev.RunFailed | None
    trace_id: str = ""

    def record(self) -> RunRecord:
        from service.run import RunRecord  # here: service.run imports this module, through the loop and executor

        return RunRecord(
            self.run_id, self.caller, self.state, self.last_seq, self.created_ns, self.ended_ns, self.outcome
        )


class RunSummaryStore(Protocol):
    async def put(self, summary: RunSummary) -> None:
        """Keep `summary`; a second put of the same run changes nothing (a handed-over run may end twice)."""

    async def put_many(self, summaries: Sequence[RunSummary]) -> None:
        """`put` each of `summaries`, in one write."""

    async def get(self, run_id: str) -> RunSummary | None: ...

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """ListRuns' ended runs (`service/listing.py`), newest first."""

    async def aclose(self) -> None: ...


def summary_of_run(run: Run) -> RunSummary:
    """An ended run's summary, for `GetRun` once the live state forgot the run."""
    record = run.record()
    return RunSummary(
        run_id=run.id,
        caller=run.caller,
        state=record.state,
        last_seq=record.last_seq,
        created_ns=record.created_ns,
        ended_ns=record.ended_ns,
        outcome=record.outcome,
    )


class SummaryWriter:
    """Writes ended runs' summaries in the background, in batches: one task while there are summaries to write, not
    one per run, and one `put_many` per batch (in SQLite one transaction, so one synced commit for the batch rather
    than one per run). A failed batch is logged, not raised: GetRun answers from the live state meanwhile, and once
    that forgets the runs it is NOT_FOUND. `store()` is read at each batch (None: nothing to write to)."""

    BATCH = 500  # runs in one write: a burst of ends is not one unbounded transaction

    def __init__(self, store: Callable[[], RunSummaryStore | None]) -> None:
        self._store = store
        self._due: list[RunSummary] = []
        self._task: asyncio.Task[None] | None = None

    def add(self, run: Run) -> None:
        self._due.append(summary_of_run(run))
        if self._task is None:
            self._task = asyncio.create_task(self._write(), name="run summaries")

    async def _write(self) -> None:
        try:
            while self._due:  # what ended during a write goes in the next batch
                batch, self._due = self._due[: self.BATCH], self._due[self.BATCH :]
                store = self._store()
                if store is None:
                    continue
                try:
                    await store.put_many(batch)
                except Exception:
                    ids = [s.run_id for s in batch[:10]]
                    log.exception("run summaries not written", extra={"runs": len(batch), "run_ids": ids})
        finally:
            self._task = None

    async def flushed(self, timeout_s: float | None = None) -> None:
        """Return once every summary added so far is written (or its write failed), or after `timeout_s`."""
        if self._task is not None:
            await asyncio.wait([self._task], timeout=timeout_s)


def summary_row(summary: RunSummary) -> dict[str, Any]:
    """A summary as stored: the outcome as codec JSON text (None when the run ended without one)."""
    outcome = None if summary.outcome is None else codec.dumps(summary.outcome).decode()
    row = {name: getattr(summary, name) for name in COLUMNS if name != "outcome"}
    return {**{k: storable(v) if type(v) is str else v for k, v in row.items()}, "outcome": outcome}


def list_sql(query: RunQuery, mark: str) -> tuple[str, list[Any]]:
    """The SELECT of `query` with `mark` as the placeholder (`?` or `%s`); the caller's index serves it."""
    where, params = ["caller = {m}"], [query.caller]  # type: list[str], list[Any]
    if query.states:
        where.append(f"state IN ({', '.join(['{m}'] * len(query.states))})")
        params += sorted(query.states)
    if query.before is not None:
        where.append("(created_ns, run_id) < ({m}, {m})")
        params += [query.before[0], query.before[1]]
    sql = (
        f"SELECT {', '.join(COLUMNS)} FROM run_summaries WHERE {' AND '.join(where)} "
        "ORDER BY created_ns DESC, run_id DESC LIMIT {m}"
    )
    return sql.replace("{m}", mark), [*params, query.limit]


def summary_of(row: dict[str, Any]) -> RunSummary:
    outcome = None if row["outcome"] is None else codec.loads(row["outcome"])
    if outcome is not None and not isinstance(outcome, ev.FinalResponse | ev.RunFailed):
        raise ValueError(f"run {row['run_id']}: a summary's outcome is a {outcome.kind} event")
    return RunSummary(**{**{name: row[name] for name in COLUMNS}, "outcome": outcome})


_SCHEMA = """
CREATE TABLE IF NOT EXISTS run_summaries (
    run_id TEXT PRIMARY KEY,
    caller TEXT NOT NULL,
    state TEXT NOT NULL,
    last_seq INTEGER NOT NULL,
    created_ns INTEGER NOT NULL,
    ended_ns INTEGER NOT NULL,
    outcome TEXT,
    trace_id TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS run_summaries_caller ON run_summaries (caller, created_ns, run_id);
"""


class SqliteRunSummaryStore:
    """The embedded default: one SQLite file, opened at the first use, written and read on a thread of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="summaries")

    async def put(self, summary: RunSummary) -> None:
        await self.put_many([summary])

    async def put_many(self, summaries: Sequence[RunSummary]) -> None:
        rows = [[row[n] for n in COLUMNS] for row in map(summary_row, summaries)]
        sql = f"INSERT OR IGNORE INTO run_summaries ({', '.join(COLUMNS)}) VALUES ({', '.join('?' * len(COLUMNS))})"

        def insert(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN")  # one transaction: one synced commit for the batch
            try:
                conn.executemany(sql, rows)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(insert)

    async def get(self, run_id: str) -> RunSummary | None:
        def read(conn: sqlite3.Connection) -> RunSummary | None:
            sql = f"SELECT {', '.join(COLUMNS)} FROM run_summaries WHERE run_id = ?"
            found = conn.execute(sql, (run_id,)).fetchone()
            return None if found is None else summary_of(dict(zip(COLUMNS, found, strict=True)))

        result: RunSummary | None = await self._run(read)
        return result

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        sql, params = list_sql(query, "?")

        def read(conn: sqlite3.Connection) -> list[RunRecord]:
            rows = conn.execute(sql, params).fetchall()
            return [summary_of(dict(zip(COLUMNS, row, strict=True))).record() for row in rows]

        result: list[RunRecord] = await self._run(read)
        return result

    async def aclose(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
        self._pool.shutdown(wait=True)

    async def _run(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self._on_thread, fn)

    def _on_thread(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._conn is None:
            self._conn = connect(self.path)
            self._conn.executescript(_SCHEMA)
        return fn(self._conn)
