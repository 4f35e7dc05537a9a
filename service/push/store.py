"""Callback deliveries, kept in the records store so that they outlive a restart: the SQLite file `push.db` under
data_dir by default, the `callback_deliveries` table of the PostgreSQL records database with `records.url`
(`pg_store.py`). One row per background run that carries a callback:

    waiting    registered at SubmitRun; the run has not ended
    pending    the run ended: `body` is the notification, due at `next_ns`, sent by whoever holds its lease
    delivered  a 2xx came back
    expired    `push.expire_s` after the run ended (or, still waiting, after `runs.max_run_s` more) with no 2xx

A sender claims due rows by setting `lease_ns` (a sending replica's lease: one sender per delivery at a time; on
PostgreSQL the claim skips rows another replica is claiming, FOR UPDATE SKIP LOCKED); an attempt that fails puts the
row back with its next time. Times are nanoseconds since the epoch.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.records.sqlite import connect, storable

DEFAULT_FILE = "push.db"
COLUMNS = (
    "delivery_id",
    "run_id",
    "caller",
    "url",
    "secret",
    "state",
    "body",
    "attempts",
    "created_ns",
    "ended_ns",
    "next_ns",
    "last_error",
)
_SELECT = ", ".join(COLUMNS)


@dataclass(frozen=True, kw_only=True, slots=True)
class Delivery:
    delivery_id: str
    run_id: str
    caller: str
    url: str
    secret: str
    state: str = "waiting"
    body: str | None = None
    attempts: int = 0  # begun, counting the one a claim starts
    created_ns: int = 0
    ended_ns: int = 0
    next_ns: int = 0
    last_error: str = ""


def delivery_of(row: tuple[Any, ...]) -> Delivery:
    return Delivery(**dict(zip(COLUMNS, row, strict=True)))


class DeliveryStore:
    """The queries, written once with `?` placeholders; a backend runs them (`_execute`)."""

    async def register(self, delivery: Delivery) -> None:
        values = [storable(v) if isinstance(v, str) else v for v in (getattr(delivery, c) for c in COLUMNS)]
        sql = f"INSERT INTO callback_deliveries ({_SELECT}) VALUES ({', '.join('?' * len(COLUMNS))})"
        await self._execute(sql, values)

    async def forget(self, run_id: str) -> None:
        """Drop a waiting registration (its SubmitRun attached to an existing run instead)."""
        await self._execute("DELETE FROM callback_deliveries WHERE run_id = ? AND state = 'waiting'", [run_id])

    async def ended(self, run_id: str, body: str, ended_ns: int, now_ns: int) -> bool:
        """The run's notification, due now; False when the run has no waiting delivery."""
        sql = (
            "UPDATE callback_deliveries SET state = 'pending', body = ?, ended_ns = ?, next_ns = ? "
            "WHERE run_id = ? AND state = 'waiting' RETURNING delivery_id"
        )
        return bool(await self._execute(sql, [body, ended_ns, now_ns, run_id], fetch=True))

    async def claim(self, now_ns: int, lease_until_ns: int, limit: int) -> list[Delivery]:
        """Due deliveries no other sender holds, leased to this one until `lease_until_ns`, one more attempt each."""
        sql = (
            "UPDATE callback_deliveries SET lease_ns = ?, attempts = attempts + 1 WHERE delivery_id IN ("
            "SELECT delivery_id FROM callback_deliveries WHERE state = 'pending' AND next_ns <= ? AND lease_ns <= ? "
            f"ORDER BY next_ns LIMIT ?{self._skip_locked}) RETURNING {_SELECT}"
        )
        rows = await self._execute(sql, [lease_until_ns, now_ns, now_ns, limit], fetch=True)
        return [delivery_of(row) for row in rows]

    async def settle(self, delivery_id: str, state: str, error: str = "") -> None:
        """`delivered` or `expired`: done with."""
        sql = "UPDATE callback_deliveries SET state = ?, lease_ns = 0, last_error = ? WHERE delivery_id = ?"
        await self._execute(sql, [state, storable(error), delivery_id])

    async def retry(self, delivery_id: str, next_ns: int, error: str) -> None:
        """The attempt failed: due again at `next_ns`, by any sender."""
        sql = "UPDATE callback_deliveries SET next_ns = ?, lease_ns = 0, last_error = ? WHERE delivery_id = ?"
        await self._execute(sql, [next_ns, storable(error), delivery_id])

    async def waiting(self, after_ns: int, before_ns: int, limit: int) -> list[Delivery]:
        """Deliveries still waiting for their run, registered between the two times, oldest first (their run may
        have ended unnoticed: its process died between the end and `ended`)."""
        sql = (
            f"SELECT {_SELECT} FROM callback_deliveries WHERE state = 'waiting' AND created_ns > ? AND created_ns < ? "
            "ORDER BY created_ns LIMIT ?"
        )
        return [delivery_of(row) for row in await self._execute(sql, [after_ns, before_ns, limit], fetch=True)]

    async def get(self, delivery_id: str) -> Delivery | None:
        sql = f"SELECT {_SELECT} FROM callback_deliveries WHERE delivery_id = ?"
        rows = await self._execute(sql, [delivery_id], fetch=True)
        return delivery_of(rows[0]) if rows else None

    _skip_locked = ""

    async def _execute(self, sql: str, params: list[Any], *, fetch: bool = False) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS callback_deliveries (
    delivery_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL UNIQUE,
    caller TEXT NOT NULL,
    url TEXT NOT NULL,
    secret TEXT NOT NULL,
    state TEXT NOT NULL,
    body TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_ns INTEGER NOT NULL,
    ended_ns INTEGER NOT NULL DEFAULT 0,
    next_ns INTEGER NOT NULL DEFAULT 0,
    lease_ns INTEGER NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS callback_deliveries_due ON callback_deliveries (next_ns) WHERE state = 'pending';
CREATE INDEX IF NOT EXISTS callback_deliveries_waiting ON callback_deliveries (created_ns) WHERE state = 'waiting';
"""


class SqliteDeliveryStore(DeliveryStore):
    """One node: a SQLite file, opened at first use, on a thread of its own (one writer: a claim is atomic)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="push")

    async def _execute(self, sql: str, params: list[Any], *, fetch: bool = False) -> list[tuple[Any, ...]]:
        def run(conn: sqlite3.Connection) -> list[tuple[Any, ...]]:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if fetch else []

        result: list[tuple[Any, ...]] = await asyncio.get_running_loop().run_in_executor(
            self._pool, self._on_thread, run
        )
        return result

    def _on_thread(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        if self._conn is None:
            self._conn = connect(self.path)
            self._conn.executescript(_SCHEMA)
        return fn(self._conn)

    async def aclose(self) -> None:
        if self._conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._pool, self._conn.close)
        self._pool.shutdown(wait=True)
