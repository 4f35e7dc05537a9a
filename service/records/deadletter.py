"""Dead letters: every tool call that finally failed, stored durably (SQLite by default) with its input, error and
traceback, so that an operator can inspect it and a caller can quote its execution id.

    python -m service.records.deadletter list [--limit N] [--tool NAME] [--db PATH | --url URL | --config FILE]
    python -m service.records.deadletter show EXECUTION_ID [--db PATH | --url URL | --config FILE]

Writes run on one worker thread (SQLite connections are not shared between threads); a write is awaited before the
`execution_failed` event goes out, so an execution id a caller sees is always on disk. Input, message and traceback
are redacted (`service/redact.py`) as they are written.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any, Protocol

from service import redact, telemetry
from service.records.rows import DeadLetter, letter_row
from service.records.sqlite import add_db_arguments, cli_db_path, cli_records_url, connect, display_url
from service.redact import Redactor

log = logging.getLogger(__name__)

DEFAULT_FILE = "deadletter.db"
_PURGE_EVERY_S = 3600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    execution_id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    run_id TEXT NOT NULL,
    call_id TEXT NOT NULL,
    tool TEXT NOT NULL,
    input TEXT NOT NULL,
    status TEXT NOT NULL,
    error_type TEXT NOT NULL,
    message TEXT NOT NULL,
    traceback TEXT NOT NULL,
    attempts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS dead_letters_created ON dead_letters (created_at);
"""


def new_execution_id() -> str:
    return f"exec_{uuid.uuid4().hex[:24]}"


class DeadLetterStore:
    """SQLite store of dead letters. `add` is async (on the store's own thread); `recent`/`get` are for the CLI."""

    def __init__(
        self,
        path: Path,
        *,
        redactor: Redactor | None = None,
        retention_s: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._redactor = redactor  # None: the process-wide one
        self._conn = connect(path)
        self._conn.executescript(_SCHEMA)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="deadletter")
        self._retention_s = retention_s
        self._clock = clock
        self._purged_at = float("-inf")
        self._purge()

    def _purge(self) -> None:
        """Delete the letters older than the retention, at most once an hour (on the thread that writes): without
        it the store grows for as long as tools fail."""
        now = self._clock()
        if self._retention_s is None or now - self._purged_at < _PURGE_EVERY_S:
            return
        self._purged_at = now
        deleted = self._conn.execute(
            "DELETE FROM dead_letters WHERE created_at < ?", [now - self._retention_s]
        ).rowcount
        if deleted:
            log.info("dead letters past their retention deleted", extra={"deleted": deleted})

    async def add(self, letter: DeadLetter) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, self._insert, letter)

    def _insert(self, letter: DeadLetter) -> None:
        self._purge()
        row = letter_row(letter, self._redactor or redact.active())
        del row["trace_id"]  # kept by the PostgreSQL store; the SQLite file has no column for it
        columns = ", ".join(row)
        self._conn.execute(
            f"INSERT INTO dead_letters ({columns}) VALUES ({', '.join('?' * len(row))})", [*row.values()]
        )

    def recent(self, *, limit: int = 50, tool: str | None = None) -> list[DeadLetter]:
        sql = "SELECT * FROM dead_letters" + (" WHERE tool = ?" if tool else "") + " ORDER BY created_at DESC LIMIT ?"
        return [_letter(r) for r in self._rows(sql, [*([tool] if tool else []), limit])]

    def get(self, execution_id: str) -> DeadLetter | None:
        rows = self._rows("SELECT * FROM dead_letters WHERE execution_id = ?", [execution_id])
        return _letter(rows[0]) if rows else None

    def _rows(self, sql: str, params: list[Any]) -> list[dict[str, Any]]:
        cursor = self._conn.execute(sql, params)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, r, strict=True)) for r in cursor.fetchall()]

    async def aclose(self) -> None:
        await asyncio.to_thread(self.close)  # closing waits for a write in flight

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._conn.close()


async def capture(store: DeadLetterSink, **fields: Any) -> DeadLetter | None:
    """Store a dead letter for a call that finally failed; None (and a logged error) when the store fails, since
    that must not fail the call: the model still gets its result."""
    letter = DeadLetter(execution_id=new_execution_id(), created_at=time.time(), **fields)
    try:
        await store.add(letter)
    except Exception:
        log.exception("dead-letter write failed", extra={"run_id": letter.run_id, "call_id": letter.call_id})
        return None
    telemetry.DEAD_LETTERS.labels(letter.tool).inc()
    log.error(
        "tool call failed; dead-lettered",
        extra={
            "run_id": letter.run_id,
            "tool": letter.tool,
            "execution_id": letter.execution_id,
            "error": letter.message,
            **telemetry.span_ids(),
        },
    )
    return letter


class DeadLetterSink(Protocol):
    """What the executor needs of a dead-letter store (this one, or PostgreSQL's): `add` returns once the letter is
    durable, so the caller may quote its execution id."""

    async def add(self, letter: DeadLetter) -> None: ...

    async def aclose(self) -> None: ...


def _letter(row: dict[str, Any]) -> DeadLetter:
    return DeadLetter(**{**row, "input": json.loads(row["input"])})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.records.deadletter", description="Inspect dead letters")
    commands = parser.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="most recent first, one line each")
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--tool", help="only this tool's")
    add_db_arguments(listing)
    show = commands.add_parser("show", help="one entry in full, as JSON")
    show.add_argument("execution_id")
    add_db_arguments(show)
    args = parser.parse_args(argv)
    url = cli_records_url(args)
    if url is not None:
        import psycopg

        from service.records import pg_deadletter  # psycopg only when asked for

        try:
            return _show(args, display_url(url), *pg_deadletter.readers(url))
        except psycopg.Error as exc:
            print(f"cannot read dead letters in {display_url(url)}: {exc}", file=sys.stderr)
            return 2
    path = cli_db_path(args, "dead_letter", DEFAULT_FILE)
    if not path.exists():
        print(f"no dead-letter store at {path}", file=sys.stderr)
        return 2
    store = DeadLetterStore(path)
    try:
        return _show(args, str(path), store.recent, store.get)
    finally:
        store.close()


def _show(
    args: argparse.Namespace,
    where: str,
    recent: Callable[..., list[DeadLetter]],
    get: Callable[[str], DeadLetter | None],
) -> int:
    if args.command == "list":
        for letter in recent(limit=args.limit, tool=args.tool):
            when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(letter.created_at))
            print(
                f"{letter.execution_id}  {when}  {letter.tool}  {letter.status}  attempts={letter.attempts}  "
                f"run={letter.run_id}  {letter.error_type}: {letter.message}"
            )
        return 0
    found = get(args.execution_id)
    if found is None:
        print(f"no dead letter {args.execution_id} in {where}", file=sys.stderr)
        return 1
    print(json.dumps(asdict(found), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
