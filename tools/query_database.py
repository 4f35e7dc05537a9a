"""query_database: read-only SQL over a SQLite database, by default a small logistics demo database built from
`tools/data/demo.sql`. Read-only is enforced by SQLite itself (read-only open plus an authorizer that also allows
only known functions), not by inspecting the SQL text.

Hostile queries are bounded too. Each query runs in a process of the tool's (`tools/_sqlite_worker.py`, which says
why), at most `max_concurrent` at once, never on a thread of the server: its memory is capped by SQLite's heap limit
there (`max_memory_mb`), a query past it fails at once with a tool error, and a call that ends (after `timeout_s`,
or cancelled) while its query still runs kills its process, whatever step SQLite is in. The value cap
(`max_value_bytes`, with a short LIKE/GLOB pattern cap) keeps one function call to milliseconds. A row has at most
`max_columns` values, so the largest row fits in `max_result_bytes`, after which rows stop being collected (marked
truncated)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
import tempfile
import threading
from contextlib import closing, suppress
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tools.base import JSON, Tool, ToolConfig, ToolError
from tools.policy import BreakerPolicy, TimeoutPolicy, ToolPolicy

DEMO_SQL = Path(__file__).parent / "data" / "demo.sql"
_WORKER = Path(__file__).with_name("_sqlite_worker.py")

Scalar = str | int | float | bool | None


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.query_database options")

    path: Path | None = Field(None, description="SQLite file to query; default <data_dir>/demo.db")
    max_rows: int = Field(1000, ge=1, description="Upper bound on rows returned, whatever the input's limit")
    timeout_s: float = Field(5.0, gt=0, description="A call ends after this long; its query's process is killed")
    max_value_bytes: int = Field(
        16 * 1024, ge=1024, description="Longest string or blob a query may read or build (SQLITE_LIMIT_LENGTH)"
    )
    max_columns: int = Field(100, ge=1, le=2000, description="Most values in a result row (SQLITE_LIMIT_COLUMN)")
    max_result_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Rows beyond this size are cut (truncated)")
    max_concurrent: int = Field(2, ge=1, le=64, description="Queries running at once, each in a process of the tool")
    max_memory_mb: int = Field(
        64, ge=8, description="SQLite memory one query may use (its process's hard_heap_limit); past it, a tool error"
    )

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


class _Worker:
    """A query process (`tools/_sqlite_worker.py`) and its pipes: one query at a time."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, max_memory: int) -> _Worker:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-I", "-S", str(_WORKER), str(max_memory)),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
            env={},  # none of the service's secrets
        )
        return cls(proc)

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None
        payload = json.dumps(request).encode()
        stdin.write(len(payload).to_bytes(4, "big") + payload)
        await stdin.drain()
        size = int.from_bytes(await stdout.readexactly(4), "big")
        # Parsed on the event loop: a thread would not shorten the stall, the parser holds the GIL (~10 ms a MiB).
        reply: dict[str, Any] = json.loads(await stdout.readexactly(size))
        return reply

    async def stop(self) -> None:
        """SIGKILL, whatever step SQLite is in, and reap it."""
        if self.proc.returncode is None:
            with suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()


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
    # Read-only, so safe to repeat; not cached, because the data under it changes. The call ends at
    # options.timeout_s; this hard timeout is the executor's backstop.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=10),
        breaker=BreakerPolicy(scope="process"),  # a database file of this pod's: its failures are this process's
        side_effects="none",
        slow_s=2,
    )

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._is_demo = self._options.path is None
        self._path = self._options.path or config.data_dir / "demo.db"
        self._demo_lock = threading.Lock()
        # Its own processes, at most max_concurrent: a query never holds a thread of the loop's shared pool, or of
        # anything else, and one still running when its call ends is killed with its process.
        self._slots = asyncio.Semaphore(self._options.max_concurrent)
        self._idle: list[_Worker] = []
        self._workers: set[_Worker] = set()  # every live process, idle or running a query
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False

    async def run(self, args: QueryInput) -> JSON:
        timeout = self._options.timeout_s
        try:
            async with asyncio.timeout(timeout):  # waiting for a slot: as long as a query may take
                await self._slots.acquire()
        except TimeoutError:
            raise ToolError(self._busy(), retryable=True) from None
        worker: _Worker | None = None
        answered = False
        try:
            if self._closed:
                raise ToolError(_CLOSED, retryable=True)
            if self._is_demo and not self._path.exists():
                await asyncio.to_thread(self.ensure_demo)  # once, and bounded: the demo's own SQL
            worker = await self._checkout()  # a new process takes about 0.1 s, not the query's time
            if self._closed:  # while it started
                raise ToolError(_CLOSED, retryable=True)
            async with asyncio.timeout(timeout):
                reply = await worker.ask(self._request(args))
            answered = True
        except TimeoutError:
            raise ToolError(_too_long(timeout)) from None
        except (OSError, asyncio.IncompleteReadError) as exc:
            if self._closed:  # aclose() killed it
                raise ToolError(_CLOSED, retryable=True) from None
            status = worker.proc.returncode if worker is not None else None
            raise ToolError(f"the query's process ended unexpectedly (exit status {status}): {exc!r}") from None
        finally:
            try:
                if worker is not None:
                    await self._check_in(worker, reusable=answered)
            finally:
                self._slots.release()
        if "error" in reply:
            raise ToolError(reply["error"])
        result: JSON = reply["ok"]
        return result

    def _request(self, args: QueryInput) -> dict[str, Any]:
        options = self._options
        return {
            "uri": self._path.resolve().as_uri(),
            "name": self._path.name,
            "sql": args.sql,
            "params": args.params,
            "limit": min(args.limit, options.max_rows),
            "max_value_bytes": options.max_value_bytes,
            "max_columns": options.max_columns,
            "max_result_bytes": options.max_result_bytes,
        }

    async def _checkout(self) -> _Worker:
        """An idle query process, or a new one."""
        if self._idle:
            return self._idle.pop()
        start = asyncio.ensure_future(_Worker.start(self._options.max_memory_mb * 2**20))
        try:
            worker = await asyncio.shield(start)
        except BaseException:
            # The call ended while the process started: a new process has run nothing, so keep it for the next.
            start.add_done_callback(self._adopt)
            raise
        self._workers.add(worker)
        return worker

    def _adopt(self, start: asyncio.Future[_Worker]) -> None:
        if start.cancelled() or start.exception() is not None:
            return
        worker = start.result()
        self._workers.add(worker)
        if self._closed:
            self._stop(worker)
        else:
            self._idle.append(worker)

    async def _check_in(self, worker: _Worker, *, reusable: bool) -> None:
        """Back to the idle ones after an answer; killed after a timeout, a cancel or a broken pipe, when its query
        may still be running: SIGKILL stops it in any step, where SQLite's interrupt would wait for the next."""
        if reusable and not self._closed and worker.proc.returncode is None:
            self._idle.append(worker)
        else:
            await asyncio.shield(self._stop(worker))

    def _stop(self, worker: _Worker) -> asyncio.Task[None]:
        """Kill and reap `worker`, in a task held until it is done (a cancelled caller does not wait for it)."""
        self._workers.discard(worker)
        task = asyncio.create_task(worker.stop(), name="query_database: stop a query process")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)
        return task

    async def aclose(self) -> None:
        self._closed = True
        self._idle.clear()
        stops = [self._stop(w) for w in list(self._workers)]
        await asyncio.gather(*stops, *self._stopping)

    def _busy(self) -> str:
        n = self._options.max_concurrent
        return f"the database is busy ({n} queries running); try again in a moment"

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


_CLOSED = "the database is closed: the server is shutting down"


def _too_long(timeout: float) -> str:
    return f"query took longer than {timeout:g} s; narrow it down"


def create(config: ToolConfig) -> QueryDatabase:
    return QueryDatabase(config)
