"""Dead letters on PostgreSQL: the same letters and API as the SQLite store (`deadletter.py`), one table for every
replica, each letter with the call's `trace_id`.

`add` returns once the letter is in PostgreSQL or, while it is away, in the local spool on disk (`postgres.py`): so an
execution id a caller sees is always written somewhere durable, and reaches the table when the database is back.
A letter written twice (its COMMIT's answer lost, then sent again from the spool) is kept once, by its execution id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import psycopg
from psycopg.rows import dict_row

from service import redact
from service.records.pg_audit import pg_text
from service.records.postgres import UNREACHABLE, Conn, PgRecords
from service.records.rows import DeadLetter, letter_row
from service.redact import Redactor

log = logging.getLogger("service.records.deadletter")

_PURGE_EVERY_S = 3600.0
_COLUMNS = [
    "execution_id",
    "created_at",
    "run_id",
    "call_id",
    "tool",
    "input",
    "status",
    "error_type",
    "message",
    "traceback",
    "attempts",
    "trace_id",
]
_INSERT = (
    f"INSERT INTO dead_letters ({', '.join(_COLUMNS)}) VALUES ({', '.join(['%s'] * len(_COLUMNS))}) "
    "ON CONFLICT (execution_id) DO NOTHING"
)


class PgDeadLetterStore:
    """`await add(letter)`; `await aclose()`. Letters older than `retention_s` are deleted, at most hourly."""

    def __init__(
        self,
        records: PgRecords,
        *,
        redactor: Redactor | None = None,
        retention_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._records = records.register("dead_letter", insert_letters)
        self._redactor = redactor
        self._retention_s = retention_s
        self._clock = clock
        self._purged_at = float("-inf")
        self._closed = False

    async def add(self, letter: DeadLetter) -> None:
        redactor = self._redactor or redact.active()
        row = await asyncio.to_thread(lambda: {k: pg_text(v) for k, v in letter_row(letter, redactor).items()})
        await self._records.write("dead_letter", [row])
        await self.purge()

    async def purge(self) -> None:
        """Delete the letters past their retention, at most once an hour; a failure waits for the next hour."""
        now = self._clock()
        if self._retention_s is None or now - self._purged_at < _PURGE_EVERY_S or not self._records.up:
            return
        self._purged_at = now
        try:
            async with self._records.connection() as conn:
                cursor = await conn.execute(
                    "DELETE FROM dead_letters WHERE created_at < %s", (now - self._retention_s,)
                )
        except UNREACHABLE as exc:
            log.warning("dead-letter purge failed", extra={"error": str(exc)[:300]})
            return
        if cursor.rowcount:
            log.info("dead letters past their retention deleted", extra={"deleted": cursor.rowcount})

    async def aclose(self) -> None:
        if not self._closed:
            self._closed = True
            await self._records.release()


async def insert_letters(conn: Conn, rows: list[dict[str, Any]]) -> None:
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT, [[row.get(n, "") for n in _COLUMNS] for row in rows])


# The command line (`python -m service.records.deadletter … --url postgresql://…`): plain blocking psycopg.


def readers(url: str) -> tuple[Callable[..., list[DeadLetter]], Callable[[str], DeadLetter | None]]:
    """`recent(limit=, tool=)` and `get(execution_id)` against the database at `url`."""

    def recent(*, limit: int = 50, tool: str | None = None) -> list[DeadLetter]:
        where = " WHERE tool = %s" if tool else ""
        sql = f"SELECT * FROM dead_letters{where} ORDER BY created_at DESC LIMIT %s"
        return _query(url, sql, [*([tool] if tool else []), limit])

    def get(execution_id: str) -> DeadLetter | None:
        found = _query(url, "SELECT * FROM dead_letters WHERE execution_id = %s", [execution_id])
        return found[0] if found else None

    return recent, get


def _query(url: str, sql: str, params: list[Any]) -> list[DeadLetter]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        rows = conn.execute(sql, params).fetchall()
    return [DeadLetter(**{**row, "input": json.loads(row["input"])}) for row in rows]
