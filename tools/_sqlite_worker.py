"""The process query_database runs its queries in, one at a time: a request on stdin, the rows or an error on
stdout, each a 4-byte big-endian length and that many bytes of JSON. Standard library only, started as
`python -I -S _sqlite_worker.py MAX_MEMORY_BYTES` with an empty environment, so nothing of the service (its
environment, its import path, its secrets) reaches it.

Why a process of its own: SQLite can spend seconds and gigabytes inside one step that neither an interrupt nor a
progress handler reaches. Nested subqueries or CTEs that each repeat a column are copied into each other by the
query flattener while the statement compiles, doubling at each level: 26 levels, some 700 characters, ask for
gigabytes. SQLite's heap limit (`PRAGMA hard_heap_limit`) stops that, but it is process-wide: set in the server,
it would bound the audit log, the dead letters and search_documents together with the queries, and their writes
would fail (records lost) whenever a hostile query took the memory up to it. Here it binds the queries alone, and
a query still running when its call ends is stopped with the process (SIGKILL) whatever step it is in, so it holds
neither a thread nor memory of the server's.

Read-only is enforced by SQLite itself (read-only open plus an authorizer that also allows only known functions),
not by inspecting the SQL text.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from contextlib import closing
from typing import Any, BinaryIO

# What a plain SELECT (with joins, subqueries, window functions and CTEs) needs; everything else, including
# ATTACH, PRAGMA, transactions and any write, is denied while the statement is prepared.
_ALLOWED_ACTIONS = frozenset({sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_RECURSIVE})
_READ_ONLY_HINT = "the database is read-only; only SELECT is allowed"

# The functions a query may call: SQLite's scalar, aggregate, window, date, math and JSON functions and the
# full-text search ones. Everything else is denied as the statement is prepared: fts3_tokenizer (it reads and
# overwrites a native pointer), load_extension, sqlite_log, the rtree debugging functions, and whatever a later
# SQLite adds until it is listed here.
_ALLOWED_FUNCTIONS = frozenset(
    """
    abs char coalesce concat concat_ws format glob hex ifnull iif instr length like likelihood likely lower ltrim
    max min nullif octet_length printf quote random randomblob replace round rtrim sign sqlite_version substr
    substring trim typeof unhex unicode unlikely upper zeroblob
    avg count group_concat string_agg sum total
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    date time datetime julianday unixepoch strftime timediff current_date current_time current_timestamp
    acos acosh asin asinh atan atan2 atanh ceil ceiling cos cosh degrees exp floor ln log log10 log2 mod pi pow
    power radians sin sinh sqrt tan tanh trunc
    json json_array json_array_length json_error_position json_extract json_insert json_object json_patch
    json_pretty json_quote json_remove json_replace json_set json_type json_valid json_group_array
    json_group_object -> ->>
    match matchinfo offsets snippet highlight bm25
    """.split()  # noqa: SIM905 - grouped by kind, a line each, rather than one name a line
)
# LIKE and GLOB patterns: the cost of a match grows with the pattern times the text ("*[a-z][a-z]…" over a long
# string), and a pattern an agent writes is a few words.
MAX_PATTERN_BYTES = 1000


class QueryFailed(Exception):
    """A failure the model reads as the tool's answer."""


def query(request: dict[str, Any], max_memory: int) -> dict[str, Any]:
    """Run the request's one SELECT: its columns and rows (at most `limit`, cut at `max_result_bytes`)."""
    limit = request["limit"]
    denied: list[str] = []
    try:
        conn = sqlite3.connect(f"{request['uri']}?mode=ro", uri=True, isolation_level=None)
    except sqlite3.Error as exc:
        raise QueryFailed(f"cannot open the database {request['name']}: {exc}") from exc
    with closing(conn):
        try:
            _restrict(conn, denied, request)
        except sqlite3.Error as exc:
            raise QueryFailed(f"cannot open the database {request['name']}: {exc}") from exc
        try:
            cursor = conn.execute(request["sql"], request["params"])
            rows, too_big = _fetch(cursor, limit + 1, request["max_result_bytes"])
        except MemoryError as exc:  # SQLITE_NOMEM: the heap limit, which Python reports as MemoryError
            raise QueryFailed(
                f"the query needs more than the {max_memory // 2**20} MiB of memory a query may use: simplify it "
                "(nested subqueries or CTEs that repeat a column double it at each level)"
            ) from exc
        except sqlite3.Error as exc:
            raise QueryFailed(_explain(exc, conn, denied, request)) from exc
        columns = [d[0] for d in cursor.description or ()]
    return {
        "columns": columns,
        # BLOBs are not JSON; hex keeps them readable and unambiguous
        "rows": [[v.hex() if isinstance(v, bytes) else v for v in row] for row in rows[:limit]],
        "row_count": min(len(rows), limit),
        "truncated": too_big or len(rows) > limit,
    }


def _restrict(conn: sqlite3.Connection, denied: list[str], request: dict[str, Any]) -> None:
    """The authorizer and SQLite's limits, on a connection about to run a query."""

    def authorize(action: int, arg1: str | None, arg2: str | None, db: str | None, source: str | None) -> int:
        if action == sqlite3.SQLITE_FUNCTION:
            if arg2 in _ALLOWED_FUNCTIONS:
                return sqlite3.SQLITE_OK
            denied.append(arg2 or "?")
            return sqlite3.SQLITE_DENY
        return sqlite3.SQLITE_OK if action in _ALLOWED_ACTIONS else sqlite3.SQLITE_DENY

    # The schema is read before the column limit applies, so a wide table elsewhere in the file does not make
    # every query fail ("malformed database schema"); selecting all its columns still does.
    conn.execute("SELECT 1 FROM sqlite_schema LIMIT 0").close()
    conn.set_authorizer(authorize)
    conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, request["max_value_bytes"])
    conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, request["max_columns"])
    conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, MAX_PATTERN_BYTES)


def _fetch(cursor: sqlite3.Cursor, most: int, budget: int) -> tuple[list[Any], bool]:
    """Up to `most` rows, stopping early (True) when they pass `budget` bytes."""
    rows: list[Any] = []
    while len(rows) < most:
        row = cursor.fetchone()
        if row is None:
            break
        budget -= sum(len(v) if isinstance(v, str | bytes) else 8 for v in row)
        if budget < 0:
            return rows, True
        rows.append(row)
    return rows, False


def _explain(exc: sqlite3.Error, conn: sqlite3.Connection, denied: list[str], request: dict[str, Any]) -> str:
    """SQLite's message plus a hint that tells the model what to do differently."""
    message = str(exc)
    if isinstance(exc, sqlite3.ProgrammingError) and "one statement" in message:
        return "only one SQL statement per call is allowed; send the statements one at a time"
    if denied:
        return (
            f"the function {denied[0]}() is not allowed; use SQLite's core, aggregate, window, date, math "
            "and JSON functions"
        )
    if "not authorized" in message or "authorization denied" in message or "readonly" in message:
        return f"{message}: {_READ_ONLY_HINT}"
    if "no such table" in message:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")]
        return f"{message}; the tables are: {', '.join(tables)}"
    if "too big" in message:
        return f"{message}: values are limited to {request['max_value_bytes']} bytes"
    if "too many columns" in message:
        return f"{message}: a row may have at most {request['max_columns']} columns; select fewer"
    if "pattern too complex" in message:
        return f"{message}: LIKE and GLOB patterns are limited to {MAX_PATTERN_BYTES} bytes"
    if "no such column" in message:
        return f"{message}; read the table's columns with SELECT sql FROM sqlite_schema WHERE name = '<table>'"
    return f"SQL error: {message}"


def read_frame(stream: BinaryIO) -> bytes | None:
    head = stream.read(4)
    if len(head) < 4:
        return None
    return stream.read(int.from_bytes(head, "big"))


def write_frame(stream: BinaryIO, payload: bytes) -> None:
    stream.write(len(payload).to_bytes(4, "big") + payload)
    stream.flush()


def serve(max_memory: int, stdin: BinaryIO, stdout: BinaryIO) -> None:
    """Answer requests until stdin closes. The heap limit is SQLite's, for the whole process: this process."""
    with closing(sqlite3.connect(":memory:")) as conn:
        conn.execute(f"PRAGMA hard_heap_limit = {int(max_memory)}")
    while (frame := read_frame(stdin)) is not None:
        try:
            reply: dict[str, Any] = {"ok": query(json.loads(frame), max_memory)}
        except QueryFailed as exc:
            reply = {"error": str(exc)}
        except MemoryError:  # Python's own allocations past the limit of the process, if one is set
            reply = {"error": "the query's result needs more memory than a query may use; select less"}
        write_frame(stdout, json.dumps(reply, ensure_ascii=False).encode("utf-8", "surrogatepass"))


if __name__ == "__main__":
    serve(int(sys.argv[1]), sys.stdin.buffer, sys.stdout.buffer)
