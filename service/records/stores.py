"""What the executor and the recorder need of the record stores, whichever backend keeps them (SQLite files by
default, PostgreSQL with `records.url`), and the bundle the composition root builds and opens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from service.records.audit import AuditRecord
from service.records.deadletter import DeadLetterSink
from service.records.summaries import RunSummaryStore

__all__ = ["AuditSink", "DeadLetterSink", "Records"]

if TYPE_CHECKING:
    from service.records.postgres import PgRecords


class AuditSink(Protocol):
    """`append` never waits and never drops; a caller awaits `room()` first when `full`."""

    @property
    def full(self) -> bool: ...

    async def room(self) -> None: ...

    def append(self, record: AuditRecord) -> None: ...

    async def flush(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class Records:
    """The stores of one process. `database` is the PostgreSQL records database they share, if any: `open` connects
    and migrates it (the SQLite stores need nothing), and closing the audit log and dead letters closes it."""

    audit: AuditSink
    dead_letter: DeadLetterSink
    summaries: RunSummaryStore
    database: PgRecords | None = None

    async def open(self) -> None:
        if self.database is not None:
            await self.database.open()
