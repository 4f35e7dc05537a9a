"""The local spool of records that PostgreSQL could not take yet: a SQLite file under data_dir where audit rows, dead
letters and run summaries wait, in the order they came, until the records database answers again.

On disk rather than in memory: PostgreSQL may be away for longer than any memory bound allows, and a process that
restarts meanwhile must still deliver what it had accepted. Several processes of one machine (`--workers`) share the
file; only one drains it at a time (an `flock` on a file beside it), so no entry is sent twice by two drainers.

An entry PostgreSQL keeps refusing (a value out of range, a constraint; not an unreachable database) moves, in one
transaction, to the `quarantine` table of the same file, body byte for byte, so that it neither blocks the entries
behind it nor is lost. An operator lists, shows and replays it (back to the end of the spool) from the command line:

    python -m service.records.spool list | show ID | replay (ID... | --all)   [--spool PATH | --config FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import sys
import time
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
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,  -- the entry's id in the spool
    kind TEXT NOT NULL,
    body TEXT NOT NULL,  -- as spooled
    error TEXT NOT NULL,  -- the last refusal
    refusals INTEGER NOT NULL,
    quarantined_at REAL NOT NULL
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

    def quarantine(self, entry_id: int, error: str, refusals: int) -> None:
        """Move the entry to the quarantine, in one transaction: it is in one table or the other, never neither."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(
                "INSERT INTO quarantine (id, kind, body, error, refusals, quarantined_at) "
                "SELECT id, kind, body, ?, ?, ? FROM spool WHERE id = ?",
                (error, refusals, time.time(), entry_id),
            )
            self._conn.execute("DELETE FROM spool WHERE id = ?", (entry_id,))
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise

    def quarantined(self) -> list[dict[str, Any]]:
        cursor = self._conn.execute(
            "SELECT id, kind, body, error, refusals, quarantined_at FROM quarantine ORDER BY id"
        )
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def quarantine_count(self) -> int:
        return int(self._conn.execute("SELECT count(*) FROM quarantine").fetchone()[0])

    def replay(self, ids: list[int] | None) -> int:
        """Move quarantined entries (all with None) back to the end of the spool, to be sent again; how many."""
        where, params = ("", []) if ids is None else (f" WHERE id IN ({', '.join('?' * len(ids))})", ids)
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            self._conn.execute(
                f"INSERT INTO spool (kind, body) SELECT kind, body FROM quarantine{where} ORDER BY id", params
            )
            moved = self._conn.execute(f"DELETE FROM quarantine{where}", params).rowcount
            self._conn.execute("COMMIT")
        except BaseException:
            self._conn.execute("ROLLBACK")
            raise
        return int(moved)

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.records.spool", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spool", type=Path, help=f"the spool file (default: {DEFAULT_FILE} in the config's data_dir)")
    parser.add_argument("--config", type=Path, help="the service's config, for its data_dir (default: AGENT_CONFIG)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", help="the quarantined records, one JSON line each, without their bodies")
    commands.add_parser("show", help="one quarantined record whole, as JSON").add_argument("id", type=int)
    replay = commands.add_parser("replay", help="move quarantined records back to the spool (the service sends them)")
    replay.add_argument("ids", type=int, nargs="*")
    replay.add_argument("--all", action="store_true")
    args = parser.parse_args(argv)
    path = args.spool
    if path is None:
        from service.config import load_config

        config = args.config or (Path(os.environ["AGENT_CONFIG"]) if os.environ.get("AGENT_CONFIG") else None)
        path = load_config(config).data_dir / DEFAULT_FILE
    if not path.exists():
        print(f"no spool at {path}", file=sys.stderr)
        return 2
    spool = Spool(path)
    try:
        entries = spool.quarantined()
        if args.command == "list":
            for e in entries:
                print(json.dumps({k: v for k, v in e.items() if k != "body"} | {"bytes": len(e["body"])}))
            return 0
        if args.command == "show":
            found = [e for e in entries if e["id"] == args.id]
            if not found:
                print(f"no quarantined record {args.id} in {path}", file=sys.stderr)
                return 1
            print(json.dumps(found[0] | {"body": json.loads(found[0]["body"])}))
            return 0
        if bool(args.ids) == args.all:
            parser.error("replay takes record ids or --all")
        moved = spool.replay(None if args.all else args.ids)
        print(f"{moved} record(s) moved back to the spool of {path}; the service sends them within a second")
        return 0 if args.all or moved == len(set(args.ids)) else 1
    finally:
        spool.close()


if __name__ == "__main__":
    sys.exit(main())
