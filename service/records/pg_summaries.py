"""Run summaries on PostgreSQL (`RunSummaryStore`, summaries.py): one row per run, for every replica's `GetRun`.
A put while the database is away waits in the local spool like the other records; a get then cannot answer and says
so (`RecordsUnavailable`, UNAVAILABLE), rather than NOT_FOUND for a run that may well be there."""

from __future__ import annotations

from typing import Any

from psycopg.rows import dict_row

from service.errors import RecordsUnavailable
from service.records.pg_audit import pg_text
from service.records.postgres import UNREACHABLE, Conn, PgRecords
from service.records.summaries import COLUMNS, RunSummary, summary_of, summary_row

_INSERT = (
    f"INSERT INTO run_summaries ({', '.join(COLUMNS)}) VALUES ({', '.join(['%s'] * len(COLUMNS))}) "
    "ON CONFLICT (run_id) DO NOTHING"
)


class PgRunSummaryStore:
    def __init__(self, records: PgRecords) -> None:
        # Not an owner: the run registry that reads summaries closes before the executor, whose audit log and dead
        # letters close the database.
        self._records = records.register("summary", insert_summaries, owner=False)

    async def put(self, summary: RunSummary) -> None:
        """Idempotent: the first summary of a run stays."""
        await self._records.write("summary", [{k: pg_text(v) for k, v in summary_row(summary).items()}])

    async def get(self, run_id: str) -> RunSummary | None:
        if not self._records.up:
            raise RecordsUnavailable("the records database does not answer; retry later")
        try:
            async with self._records.connection() as conn:
                cursor = conn.cursor(row_factory=dict_row)
                await cursor.execute(f"SELECT {', '.join(COLUMNS)} FROM run_summaries WHERE run_id = %s", (run_id,))
                row = await cursor.fetchone()
        except UNREACHABLE as exc:
            raise RecordsUnavailable("the records database does not answer; retry later") from exc
        return None if row is None else summary_of(row)

    async def aclose(self) -> None:
        pass


async def insert_summaries(conn: Conn, rows: list[dict[str, Any]]) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT, [[row[n] for n in COLUMNS] for row in rows])
