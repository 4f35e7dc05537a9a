"""The local spool of records that PostgreSQL could not take yet: a SQLite file under data_dir where audit rows, dead
letters and run summaries wait, in the order they came, until the records database answers again.

On disk rather than in memory: PostgreSQL may be away for longer than any memory bound allows, and a process that
restarts meanwhile must still deliver what it had accepted. Several processes of one machine (`--workers`) share the
file; only one drains it at a time (an `flock` on a file beside it), so no entry is sent twice by two drainers.
"""

from __future__ import annotations

import fcntl
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.records.sqlite import connect

DEFAULT_FILE = "records-spool.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    kind TEXT NOT NULL,
    body TEXT NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    kind: str  # "audit", "dead_letter", "summary"
    body: dict[str, Any]


class Spool:
    """Blocking calls: the caller runs them on a thread of its own (they wait for the disk)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        self._lock_path = path.with_name(f"{path.name}.lock")
        self._lock_fd: int | None = None

    def put(self, kind: str, bodies: list[dict[str, Any]]) -> None:
        """Append `bodies`, committed (synchronous=FULL) before returning: a record handed to the spool survives a
        crash."""
        rows = [(kind, json.dumps(b, ensure_ascii=True, separators=(",", ":"))) for b in bodies]
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.executemany("INSERT INTO spool (kind, body) VALUES (?, ?)", rows)
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM spool").fetchone()[0])

    def first(self, limit: int) -> list[Entry]:
        """The oldest `limit` entries, in order."""
        cursor = self._conn.execute("SELECT id, kind, body FROM spool ORDER BY id LIMIT ?", (limit,))
        return [Entry(i, kind, json.loads(body)) for i, kind, body in cursor.fetchall()]

    def remove(self, ids: list[int]) -> None:
        self._conn.executemany("DELETE FROM spool WHERE id = ?", [(i,) for i in ids])

    def try_lock(self) -> bool:
        """Take the drain lock without waiting: False when another process of the machine is draining. Held (an
        `flock`, which any thread may release) until `unlock`."""
        if self._lock_fd is not None:
            return True
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing releases the lock
            self._lock_fd = None

    def close(self) -> None:
        self.unlock()
        self._conn.close()
