"""Callback deliveries in the PostgreSQL records database (`callback_deliveries`, migration 4): every replica claims
from one table, and a claim skips the rows another replica is claiming (FOR UPDATE SKIP LOCKED), so each delivery
is sent by one replica at a time. Not spooled like the other records: a claim needs the database, and a delivery
registered while it is away is refused (UNAVAILABLE) rather than kept where no other replica sees it."""

from __future__ import annotations

from typing import Any

from service.errors import RecordsUnavailable
from service.push.store import DeliveryStore
from service.records.postgres import UNREACHABLE, PgRecords


class PgDeliveryStore(DeliveryStore):
    _skip_locked = " FOR UPDATE SKIP LOCKED"

    def __init__(self, records: PgRecords) -> None:
        self._records = records

    async def _execute(self, sql: str, params: list[Any], *, fetch: bool = False) -> list[tuple[Any, ...]]:
        try:
            async with self._records.connection() as conn:
                cursor = await conn.execute(sql.replace("?", "%s").encode(), params)
                rows: list[tuple[Any, ...]] = await cursor.fetchall() if fetch else []
                return rows
        except UNREACHABLE as exc:
            raise RecordsUnavailable("the records database does not answer; retry later") from exc
