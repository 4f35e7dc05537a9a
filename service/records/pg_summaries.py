"""Run summaries on PostgreSQL (`RunSummaryStore`, summaries.py): one row per run, for every replica's `GetRun`.
A put while the database is away waits in the local spool like the other records; a get then cannot answer and says
so (`RecordsUnavailable`, UNAVAILABLE), rather than NOT_FOUND for a run that may well be there."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from psycopg.rows import dict_row

from service.errors import RecordsUnavailable
from service.records.pg_audit import pg_text
from service.records.postgres import UNREACHABLE, Conn, PgRecords
from service.records.summaries import COLUMNS, RunSummary, list_sql, summary_of, summary_row

if TYPE_CHECKING:
    from service.listing import RunQuery
    from service.run import RunRecord

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
        await self.put_many([summary])

    async def put_many(self, summaries: Sequence[RunSummary]) -> None:
        await self._records.write("summary", [{k: pg_text(v) for k, v in summary_row(s).items()} for s in summaries])

    async def get(self, run_id: str) -> RunSummary | None:
        sql = f"SELECT {', '.join(COLUMNS)} FROM run_summaries WHERE run_id = %s"
        rows = await self._select(sql, [run_id])
        return summary_of(rows[0]) if rows else None

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        sql, params = list_sql(query, "%s")
        return [summary_of(row).record() for row in await self._select(sql, params)]

    async def _select(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        if not self._records.up:
            raise RecordsUnavailable("the records database does not answer; retry later")
        try:
            async with self._records.connection() as conn:
                cursor = conn.cursor(row_factory=dict_row)
                await cursor.execute(sql.encode(), params)
                rows: list[dict[str, Any]] = await cursor.fetchall()
                return rows
        except UNREACHABLE as exc:
            raise RecordsUnavailable("the records database does not answer; retry later") from exc

    async def aclose(self) -> None:
        pass


async def insert_summaries(conn: Conn, rows: list[dict[str, Any]]) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT, [[row[n] for n in COLUMNS] for row in rows])
