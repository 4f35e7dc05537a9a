"""query_database: read-only SQL over a SQLite database, by default a small logistics demo database built from
`tools/data/demo.sql`. Read-only is enforced by SQLite itself (read-only open plus an authorizer that also allows
only known functions), not by inspecting the SQL text.

Hostile queries are bounded too. Queries run on the tool's own threads (`max_concurrent`), never on the event
loop's shared pool, and a call ends at `timeout_s` whatever its query is doing: then the loop interrupts the
statement, which SQLite stops at its next row or loop step. SQLite cannot stop inside one step (compiling the
statement, or computing one row's expressions), so such a step keeps its thread until it ends. The small value
cap (`max_value_bytes`, with a short LIKE/GLOB pattern cap) keeps one function call in it to milliseconds, but
SQLite's query flattener can repeat a call or an expression any number of times in one step (docs/security.md,
"Hostile input"). A row has at most `max_columns` values, so the largest row fits in `max_result_bytes`, after which
rows stop being collected (marked truncated)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tools.base import JSON, Tool, ToolConfig, ToolError
from tools.policy import TimeoutPolicy, ToolPolicy

DEMO_SQL = Path(__file__).parent / "data" / "demo.sql"

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
_MAX_PATTERN_BYTES = 1000

Scalar = str | int | float | bool | None


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.query_database options")

    path: Path | None = Field(None, description="SQLite file to query; default <data_dir>/demo.db")
    max_rows: int = Field(1000, ge=1, description="Upper bound on rows returned, whatever the input's limit")
    timeout_s: float = Field(5.0, gt=0, description="A call ends after this long; its query is interrupted")
    max_value_bytes: int = Field(
        16 * 1024, ge=1024, description="Longest string or blob a query may read or build (SQLITE_LIMIT_LENGTH)"
    )
    max_columns: int = Field(100, ge=1, le=2000, description="Most values in a result row (SQLITE_LIMIT_COLUMN)")
    max_result_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Rows beyond this size are cut (truncated)")
    max_concurrent: int = Field(2, ge=1, le=64, description="Queries running at once, each on a thread of the tool")

    @model_validator(mode="after")
    def _largest_row_fits(self) -> Options:
        # A row is fetched whole before it is charged to max_result_bytes: bound it before it is built.
        if self.max_value_bytes * self.max_columns > self.max_result_bytes:
            raise ValueError(
                f"max_value_bytes × max_columns ({self.max_value_bytes} × {self.max_columns}) must not exceed "
                f"max_result_bytes ({self.max_result_bytes}): that is the largest row a query can return"
            )
        return self


class QueryInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the model made up is an error it reads, not ignored

    sql: str = Field(
        min_length=1,
        max_length=20_000,
        description="Exactly one SQLite SELECT statement (WITH … SELECT is fine). Use ? placeholders for params.",
    )
    limit: int = Field(100, ge=1, le=1000, description="Maximum number of rows to return.")
    params: list[Scalar] = Field(
        default_factory=list, max_length=100, description="Values bound to the ? placeholders of `sql`, in order."
    )


class _Deadline:
    """One call's deadline, shared by the thread running its query and the event loop waiting for it: the loop
    calls `stop` when the time is up or the call is cancelled, which interrupts the running statement."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.stopped = False
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()  # so that `stop` never interrupts a connection being closed

    def passed(self) -> bool:
        return self.stopped or time.monotonic() > self.at

    @contextmanager
    def watching(self, conn: sqlite3.Connection) -> Iterator[None]:
        with self._lock:
            self._conn = conn
        try:
            yield
        finally:
            with self._lock:
                self._conn = None

    def stop(self) -> None:
        with self._lock:
            self.stopped = True
            if self._conn is not None:
                self._conn.interrupt()


def _json_value(value: Any) -> JSON:
    # BLOBs are not JSON; hex keeps them readable and unambiguous.
    return value.hex() if isinstance(value, bytes) else value


class QueryDatabase(Tool[QueryInput]):
    name: ClassVar[str] = "query_database"
    description: ClassVar[str] = (
        "Run one read-only SQL SELECT (SQLite dialect) against the operations database and get the rows back. "
        "Use it for facts about customers, orders, products, shipments and carriers: counts, late or delayed "
        "shipments, totals per customer, carrier performance. Only SELECT works; writes are refused. "
        "Tables: carriers(id, name, mode ['road','air','sea','rail'], contact_email, on_time_target_pct); "
        "warehouses(id, code, city, country); "
        "customers(id, name, segment ['enterprise','smb','retail'], city, country, email, created_at); "
        "products(id, sku, name, category, unit_price_eur, weight_kg, hazardous 0/1); "
        "orders(id, customer_id, ordered_at, status ['pending','processing','shipped','delivered','cancelled'], "
        "total_eur); order_items(order_id, product_id, quantity, unit_price_eur); "
        "shipments(id, order_id, carrier_id, warehouse_id, tracking_number, "
        "status ['in_transit','delivered','delayed','exception'], shipped_at, promised_at, delivered_at, "
        "delay_reason). Timestamps are 'YYYY-MM-DD HH:MM' text. "
        "The result is {columns, rows, row_count, truncated}; truncated means more rows matched than `limit` "
        "(or the rows passed the result size cap): narrow the query."
    )
    Input: ClassVar[type[BaseModel]] = QueryInput
    # Read-only, so idempotent; not cached, because the data under it changes. The call ends at options.timeout_s;
    # this hard timeout is the executor's backstop.
    policy: ClassVar[ToolPolicy] = ToolPolicy(timeout=TimeoutPolicy(seconds=10), idempotent=True, slow_s=2)

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._is_demo = self._options.path is None
        self._path = self._options.path or config.data_dir / "demo.db"
        self._demo_lock = threading.Lock()
        # Its own threads: a query SQLite cannot stop at once never holds a thread of the loop's shared pool, which
        # search_documents, DNS lookups and the sandbox's file staging need.
        self._pool = ThreadPoolExecutor(self._options.max_concurrent, thread_name_prefix=self.name)
        self._running: set[_Deadline] = set()

    async def run(self, args: QueryInput) -> JSON:
        timeout = self._options.timeout_s
        deadline = _Deadline(timeout)
        try:
            job = self._pool.submit(self._query, args, deadline)
        except RuntimeError:  # after aclose(): the pool takes no more work
            raise ToolError("the database is closed: the server is shutting down", retryable=True) from None
        self._running.add(deadline)
        done = asyncio.wrap_future(job)
        try:
            await asyncio.wait({done}, timeout=timeout)
            if done.done():
                return done.result()
            if job.cancel():  # still waiting for a thread
                raise ToolError(self._busy(), retryable=True)
            # The query's thread stops at SQLite's next check, or at the end of the step it is in; the call ends now.
            raise ToolError(_too_long(timeout))
        finally:
            deadline.stop()
            self._running.discard(deadline)
            done.cancel()  # drops a result that comes too late
            del job, done  # they hold the query's error, whose traceback holds this frame: no cycle for the GC

    async def aclose(self) -> None:
        for deadline in list(self._running):
            deadline.stop()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _busy(self) -> str:
        n = self._options.max_concurrent
        return f"the database is busy ({n} queries running); try again in a moment"

    def _query(self, args: QueryInput, deadline: _Deadline) -> JSON:
        if deadline.passed():  # waited for a thread until the call's time was up
            raise ToolError(self._busy(), retryable=True)
        if self._is_demo:
            self.ensure_demo()
        limit = min(args.limit, self._options.max_rows)
        denied: list[str] = []
        try:
            conn = sqlite3.connect(f"{self._path.resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
        except sqlite3.Error as exc:
            raise ToolError(f"cannot open the database {self._path.name}: {exc}") from exc
        with closing(conn), deadline.watching(conn):
            try:
                self._restrict(conn, denied, deadline)
            except sqlite3.Error as exc:
                raise ToolError(f"cannot open the database {self._path.name}: {exc}") from exc
            try:
                cursor = conn.execute(args.sql, args.params)
                rows, too_big = self._fetch(cursor, limit + 1)
            except sqlite3.Error as exc:
                if deadline.passed():
                    raise ToolError(_too_long(self._options.timeout_s)) from exc
                raise ToolError(self._explain(exc, conn, denied)) from exc
            columns = [d[0] for d in cursor.description or ()]
        truncated = too_big or len(rows) > limit
        rows = rows[:limit]
        return {
            "columns": columns,
            "rows": [[_json_value(v) for v in row] for row in rows],
            "row_count": len(rows),
            "truncated": truncated,
        }

    def _restrict(self, conn: sqlite3.Connection, denied: list[str], deadline: _Deadline) -> None:
        """The authorizer, the deadline check and SQLite's limits, on a connection about to run a query."""

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
        # Between rows and loop steps, like the interrupt from `_Deadline.stop`, which does not wait for this tick.
        conn.set_progress_handler(deadline.passed, 1000)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self._options.max_value_bytes)
        conn.setlimit(sqlite3.SQLITE_LIMIT_COLUMN, self._options.max_columns)
        conn.setlimit(sqlite3.SQLITE_LIMIT_LIKE_PATTERN_LENGTH, _MAX_PATTERN_BYTES)

    def _fetch(self, cursor: sqlite3.Cursor, most: int) -> tuple[list[Any], bool]:
        """Up to `most` rows, stopping early (True) when they pass `max_result_bytes`."""
        budget = self._options.max_result_bytes
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

    def _explain(self, exc: sqlite3.Error, conn: sqlite3.Connection, denied: list[str]) -> str:
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
            return f"{message}: values are limited to {self._options.max_value_bytes} bytes"
        if "too many columns" in message:
            return f"{message}: a row may have at most {self._options.max_columns} columns; select fewer"
        if "pattern too complex" in message:
            return f"{message}: LIKE and GLOB patterns are limited to {_MAX_PATTERN_BYTES} bytes"
        if "no such column" in message:
            return f"{message}; read the table's columns with SELECT sql FROM sqlite_schema WHERE name = '<table>'"
        return f"SQL error: {message}"

    def ensure_demo(self) -> None:
        """Build the demo database on first use: in a temporary file renamed into place, so another process
        never sees a half-built file and two processes building at once both end with a complete one."""
        with self._demo_lock:
            if self._path.exists():
                return
            self._path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=self._path.parent, prefix=".demo-", suffix=".db")
            os.close(fd)
            try:
                with closing(sqlite3.connect(tmp_name)) as conn:
                    conn.executescript(DEMO_SQL.read_text(encoding="utf-8"))
                os.replace(tmp_name, self._path)
            except BaseException:
                Path(tmp_name).unlink(missing_ok=True)
                raise


def _too_long(timeout: float) -> str:
    return f"query took longer than {timeout:g} s; narrow it down"


def create(config: ToolConfig) -> QueryDatabase:
    return QueryDatabase(config)
