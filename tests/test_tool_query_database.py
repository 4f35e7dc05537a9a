"""query_database against real SQLite files in tmp_path: reads work, every kind of write is refused by SQLite."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import sqlite3
import sys
import time
import types
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tools import ToolConfig, ToolError, load_tools
from tools.query_database import Options, QueryDatabase, create

FOREVER = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
# About 60 ms a row (trim() over 16 000 characters with a set of 1 300), a dozen VM steps: SQLite's progress
# handler (every 1000 steps) sees its deadline only every ~3 s, an interrupt at the next row.
SLOW_ROWS = (
    "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n LIMIT 1000) "
    "SELECT sum(length(trim(printf('%.16000c', 'a') || i, printf('%.1300c', 'b') || 'a'))) FROM n"
)


def one_long_step(repeat: int) -> str:
    """A statement SQLite cannot interrupt for a while: the query flattener copies instr() over 16 000 and 8 000
    characters (~1.5 ms a call) into one row's expression `100 × repeat` times, and no check runs inside a row."""
    return (
        "WITH t(h, n) AS (SELECT printf('%.16000c', 'a'), printf('%.8000c', 'a') || 'b'), "
        "a(x) AS (SELECT instr(h, n) FROM t), "
        f"b(y) AS (SELECT {' + '.join(['x'] * 10)} FROM a), "
        f"c(z) AS (SELECT {' + '.join(['y'] * 10)} FROM b) "
        f"SELECT {' + '.join(['z'] * repeat)} FROM c"
    )


@pytest.fixture
async def tool(tmp_path: Path) -> AsyncIterator[QueryDatabase]:
    tool = create(ToolConfig(data_dir=tmp_path))
    yield tool
    await tool.aclose()


async def query(tool: QueryDatabase, sql: str, **extra: Any) -> Any:
    return await tool.run(tool.validate({"sql": sql, **extra}))


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


async def test_select_builds_the_demo_database_and_returns_rows(tool: QueryDatabase, tmp_path: Path) -> None:
    result = await query(tool, "SELECT id, name, mode FROM carriers ORDER BY id")
    assert result["columns"] == ["id", "name", "mode"]
    assert result["row_count"] == len(result["rows"]) == 6
    assert result["rows"][0][0] == 1
    assert result["truncated"] is False
    # Built atomically: the database is there and no temporary file is left behind.
    assert file_names(tmp_path) == ["demo.db"]


async def test_join_finds_delayed_shipments_with_their_carrier_and_customer(tool: QueryDatabase) -> None:
    result = await query(
        tool,
        """
        SELECT s.tracking_number, ca.name AS carrier, cu.name AS customer, s.delay_reason
        FROM shipments s
        JOIN carriers ca ON ca.id = s.carrier_id
        JOIN orders o ON o.id = s.order_id
        JOIN customers cu ON cu.id = o.customer_id
        WHERE s.status = ?
        ORDER BY s.promised_at
        """,
        params=["delayed"],
    )
    assert result["columns"] == ["tracking_number", "carrier", "customer", "delay_reason"]
    assert result["row_count"] >= 3
    assert all(row[3] for row in result["rows"])


async def test_ctes_and_window_functions_are_plain_selects(tool: QueryDatabase) -> None:
    result = await query(
        tool,
        "WITH totals AS (SELECT customer_id, sum(total_eur) AS spent FROM orders GROUP BY customer_id) "
        "SELECT customer_id, rank() OVER (ORDER BY spent DESC) FROM totals",
        limit=3,
    )
    assert [row[1] for row in result["rows"]] == [1, 2, 3]


async def test_limit_truncates_and_max_rows_caps_it(tool: QueryDatabase, tmp_path: Path) -> None:
    result = await query(tool, "SELECT * FROM orders", limit=10)
    assert (result["row_count"], result["truncated"]) == (10, True)

    capped = create(ToolConfig(data_dir=tmp_path, options={"max_rows": 4}))
    result = await query(capped, "SELECT * FROM orders", limit=50)
    assert (result["row_count"], result["truncated"]) == (4, True)


@pytest.mark.parametrize(
    "sql",
    [
        "INSERT INTO carriers (name, mode, contact_email, on_time_target_pct) VALUES ('X', 'road', 'x@x', 90)",
        "UPDATE orders SET status = 'cancelled'",
        "DELETE FROM shipments",
        "DROP TABLE customers",
        "CREATE TABLE notes (text TEXT)",
        "CREATE TEMP TABLE scratch (a)",
        "ATTACH DATABASE 'other.db' AS other",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = WAL",
        "VACUUM",
        "BEGIN IMMEDIATE",
    ],
)
async def test_writes_are_refused_and_the_file_is_unchanged(tool: QueryDatabase, tmp_path: Path, sql: str) -> None:
    await query(tool, "SELECT 1")
    before = digest(tmp_path / "demo.db")
    with pytest.raises(ToolError, match="read-only; only SELECT is allowed") as caught:
        await query(tool, sql)
    assert caught.value.retryable is False
    assert digest(tmp_path / "demo.db") == before
    assert not (tmp_path / "other.db").exists()


async def test_multiple_statements_are_refused(tool: QueryDatabase) -> None:
    with pytest.raises(ToolError, match="only one SQL statement"):
        await query(tool, "SELECT 1; DELETE FROM orders")


async def test_unknown_table_names_the_tables(tool: QueryDatabase) -> None:
    with pytest.raises(ToolError, match="no such table: shipment;.*shipments"):
        await query(tool, "SELECT * FROM shipment")


async def test_syntax_error_is_a_tool_error(tool: QueryDatabase) -> None:
    with pytest.raises(ToolError, match="syntax error"):
        await query(tool, "SELEC * FROM orders")


async def test_a_call_after_close_is_a_retryable_tool_error(tool: QueryDatabase) -> None:
    await tool.aclose()  # as the drain does; a call still arriving must not fail with the pool's RuntimeError
    with pytest.raises(ToolError, match="the database is closed") as caught:
        await query(tool, "SELECT 1")
    assert caught.value.retryable and not tool._workers


def test_limit_rule_is_validated_and_in_the_schema(tool: QueryDatabase) -> None:
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT 1", "limit": 1001})
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT 1", "limit": 0})
    limit = tool.input_schema()["properties"]["limit"]
    assert (limit["minimum"], limit["maximum"]) == (1, 1000)


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="max_row"):
        create(ToolConfig(data_dir=tmp_path, options={"max_row": 10}))


async def test_missing_configured_database_is_not_created(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"path": str(tmp_path / "nope.db")}))
    with pytest.raises(ToolError, match="nope.db"):
        await query(tool, "SELECT 1")
    assert not (tmp_path / "nope.db").exists()


async def test_concurrent_calls(tool: QueryDatabase) -> None:
    results = await asyncio.gather(
        *(query(tool, "SELECT count(*) FROM order_items WHERE order_id <= ?", params=[i]) for i in range(1, 21))
    )
    counts = [r["rows"][0][0] for r in results]
    assert counts == sorted(counts) and counts[-1] > counts[0]


async def test_long_query_is_aborted(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.2}))
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"query took longer than 0\.2 s"):
        await query(tool, FOREVER)
    assert time.monotonic() - started < 3


async def test_a_slow_query_does_not_hold_up_other_calls(tmp_path: Path) -> None:
    """One runaway query runs into its 0.5 s cap on its own worker thread while ten quick selects finish at once."""
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.5}))
    await query(tool, "SELECT 1")  # builds the demo database first
    started = time.monotonic()
    slow = asyncio.create_task(query(tool, FOREVER))
    await asyncio.sleep(0.05)
    quick = await asyncio.gather(
        *(query(tool, "SELECT count(*) FROM orders WHERE id > ?", params=[i]) for i in range(10))
    )
    quick_done = time.monotonic() - started
    assert len(quick) == 10 and all(r["row_count"] == 1 for r in quick)
    assert not slow.done(), f"the quick selects waited for the slow one ({quick_done:.2f} s)"
    with pytest.raises(ToolError, match=r"query took longer than 0\.5 s"):
        await slow
    assert 0.45 < time.monotonic() - started < 5


async def test_a_step_sqlite_cannot_interrupt_still_ends_the_call_at_its_timeout(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.2}))
    await query(tool, "SELECT 1")
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"query took longer than 0\.2 s"):
        await query(tool, one_long_step(10))  # about 1 s of work inside one row
    assert time.monotonic() - started < 0.9  # the step alone takes about 1 s
    assert not tool._workers  # its process was killed: the step does not go on using a CPU
    await tool.aclose()


async def test_stuck_queries_never_hold_the_shared_thread_pool(tmp_path: Path) -> None:
    """The loop's default pool (search_documents, DNS lookups, sandbox staging) stays free while queries that
    SQLite cannot stop keep running past their calls."""
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(2))
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.2}))
    await query(tool, "SELECT 1")
    stuck = [asyncio.create_task(query(tool, one_long_step(10))) for _ in range(2)]
    await asyncio.sleep(0.05)
    started = time.monotonic()
    assert await asyncio.to_thread(lambda: "free") == "free"
    assert time.monotonic() - started < 0.5  # the stuck steps take about 1 s each
    for call in stuck:
        with pytest.raises(ToolError, match="took longer"):
            await call
    await tool.aclose()


async def test_a_call_that_finds_every_process_busy_waits_its_timeout_then_says_so(tmp_path: Path) -> None:
    """The one process is taken by a slow query for its 0.3 s, after the demo database is built and the process
    started (neither counts as the query's time): a call queued behind it gives up after its own 0.3 s."""
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.3, "max_concurrent": 1}))
    await query(tool, "SELECT 1")  # the demo database and the process, made before the clock starts
    # The one slot held, as a query that runs past the waiter's timeout holds it: a slow query's own 0.3 s would
    # race the waiter's 0.3 s.
    await tool._slots.acquire()
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"busy \(1 queries running\); try again") as caught:
        await query(tool, "SELECT 1")
    assert caught.value.retryable is True
    assert time.monotonic() - started >= 0.3
    tool._slots.release()
    assert (await query(tool, "SELECT 1"))["rows"] == [[1]]
    await tool.aclose()


async def test_the_deadline_interrupts_a_query_at_its_next_row(tmp_path: Path) -> None:
    """Without the interrupt the query's only thread would stay busy until the progress handler's next tick."""
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.3, "max_concurrent": 1}))
    with pytest.raises(ToolError, match=r"query took longer than 0\.3 s"):
        await query(tool, SLOW_ROWS)
    started = time.monotonic()
    assert (await query(tool, "SELECT 1"))["rows"] == [[1]]
    assert time.monotonic() - started < 2


async def test_huge_values_and_results_are_capped(tmp_path: Path) -> None:
    tool = create(
        ToolConfig(data_dir=tmp_path, options={"max_value_bytes": 4096, "max_columns": 2, "max_result_bytes": 10_000})
    )
    with pytest.raises(ToolError, match="too big: values are limited to 4096 bytes"):
        await query(tool, "SELECT randomblob(1000000000)")
    result = await query(tool, "SELECT hex(randomblob(1000)) FROM orders", limit=1000)
    assert result["truncated"] is True and result["row_count"] == 5  # 2000 characters a row, 10 000 allowed


# The costliest single calls SQLite has (quadratic in their arguments) at the largest values the defaults allow.
BIG = Options.model_fields["max_value_bytes"].default - 16
COSTLY_CALLS = {
    "instr": f"SELECT instr(printf('%.{BIG}c', 'a'), printf('%.{BIG // 2}c', 'a') || 'b')",
    "replace": f"SELECT length(replace(printf('%.{BIG}c', 'a'), printf('%.{BIG // 2}c', 'a') || 'b', ''))",
    "trim": f"SELECT length(trim(printf('%.{BIG}c', 'a'), printf('%.1300c', 'b') || 'a'))",
    "glob": f"SELECT printf('%.{BIG}c', 'a') GLOB '*' || replace(printf('%.199c', 'x'), 'x', '[a-z]') || 'b'",
}


@pytest.mark.parametrize("sql", COSTLY_CALLS.values(), ids=COSTLY_CALLS.keys())
async def test_one_function_call_takes_milliseconds_at_the_default_limits(tool: QueryDatabase, sql: str) -> None:
    await query(tool, "SELECT 1")
    started = time.monotonic()
    result = await query(tool, sql)
    assert time.monotonic() - started < 1  # 1 to 60 ms; 3 to 7 s each with the old 1 MiB limit
    assert result["rows"][0][0] in (0, BIG)


async def test_long_like_and_glob_patterns_are_refused(tool: QueryDatabase) -> None:
    # GLOB '*[a-z][a-z]…' as long as a value (16 KiB) took 0.5 s a call; a pattern is held to 1000 bytes.
    with pytest.raises(ToolError, match="patterns are limited to 1000 bytes"):
        await query(tool, "SELECT 'a' GLOB '*' || replace(printf('%.200c', 'x'), 'x', '[a-z]')")


async def test_a_row_never_holds_more_than_the_result_cap(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path))
    # 1500 columns of a 1 MB blob took 2.9 GB before the result cap saw the row.
    with pytest.raises(ToolError, match="at most 100 columns; select fewer"):
        await query(tool, "WITH t(b) AS (SELECT zeroblob(1000)) SELECT " + ", ".join(["b"] * 101) + " FROM t")
    small = create(
        ToolConfig(data_dir=tmp_path, options={"max_value_bytes": 1024, "max_columns": 4, "max_result_bytes": 4096})
    )
    row = await query(small, "WITH t(b) AS (SELECT zeroblob(1000)) SELECT b, b, b, b FROM t")
    assert row["row_count"] == 1 and len(row["columns"]) == 4
    with pytest.raises(ToolError, match="at most 4 columns"):
        await query(small, "WITH t(b) AS (SELECT zeroblob(1000)) SELECT b, b, b, b, b FROM t")


def test_the_largest_row_must_fit_the_result_cap(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="largest row"):
        create(ToolConfig(data_dir=tmp_path, options={"max_value_bytes": 1024 * 1024}))


async def test_a_wide_table_elsewhere_in_the_database_does_not_break_queries(tmp_path: Path) -> None:
    path = tmp_path / "ops.db"
    with sqlite3.connect(path) as conn:
        conn.execute(f"CREATE TABLE wide ({', '.join(f'c{i}' for i in range(150))})")
        conn.execute("CREATE TABLE notes (body TEXT)")
        conn.execute("INSERT INTO notes VALUES ('hello')")
    conn.close()
    tool = create(ToolConfig(data_dir=tmp_path, options={"path": str(path)}))
    assert (await query(tool, "SELECT body FROM notes"))["rows"] == [["hello"]]
    assert (await query(tool, "SELECT c0, c149 FROM wide"))["row_count"] == 0
    with pytest.raises(ToolError, match="at most 100 columns"):
        await query(tool, "SELECT * FROM wide")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT fts3_tokenizer('simple')",  # returns a native pointer
        "SELECT fts3_tokenizer('simple', x'4141414141414141')",  # overwrites it
        "SELECT load_extension('/tmp/x.so')",
        "SELECT sqlite_log(1, 'forged log line')",
        "SELECT rtreenode(2, x'00')",
    ],
)
async def test_functions_outside_the_allowed_list_are_refused(tool: QueryDatabase, sql: str) -> None:
    name = sql.split()[1].split("(")[0]
    with pytest.raises(ToolError, match=rf"the function {name}\(\) is not allowed") as caught:
        await query(tool, sql)
    assert caught.value.retryable is False


async def test_everyday_functions_are_allowed(tool: QueryDatabase) -> None:
    result = await query(
        tool,
        """
        SELECT upper(substr(name, 1, 3)), length(name), lower(mode) LIKE 'r%', coalesce(NULL, id), iif(id, 'y', 'n'),
               printf('%05.1f', on_time_target_pct), round(sqrt(id * 1.0), 2), date('2026-01-31', '+1 day'),
               json_extract('{"a": [1, 2]}', '$.a[1]'), '{"b": 3}' ->> '$.b', replace(trim(' x '), 'x', 'y'),
               instr(name, 'a') >= 0, typeof(id), abs(-id), hex(zeroblob(2)), nullif(1, 1),
               count(*) OVER (), rank() OVER (ORDER BY id), lag(id) OVER (ORDER BY id),
               (SELECT group_concat(code) FROM warehouses), (SELECT max(total_eur) FROM orders)
        FROM carriers ORDER BY id LIMIT 1
        """,
    )
    row = result["rows"][0]
    assert row[7] == "2026-02-01" and row[8] == 2 and row[9] == 3 and row[10] == "y" and row[14] == "0000"


def test_oversized_sql_and_params_are_rejected(tool: QueryDatabase) -> None:
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT " + "1+" * 20_000 + "1"})
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT ?", "params": [1] * 101})


async def test_cancelling_a_call_stops_its_query(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 5, "max_concurrent": 1}))
    task = asyncio.create_task(query(tool, SLOW_ROWS))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The tool's only process is free again at once (a new one starts), well before the 5 s timeout.
    started = time.monotonic()
    assert (await query(tool, "SELECT 1"))["rows"] == [[1]]
    assert time.monotonic() - started < 2.5


async def test_aclose_stops_the_queries_still_running(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 5}))
    task = asyncio.create_task(query(tool, SLOW_ROWS))
    await asyncio.sleep(0.2)
    started = time.monotonic()
    await tool.aclose()
    with pytest.raises(ToolError):
        await task
    assert time.monotonic() - started < 2.5  # the query's own timeout is 5 s


async def test_a_failed_call_leaves_no_cycle_for_the_collector(tool: QueryDatabase) -> None:
    """The error holds the call's frames in its traceback; the frames must not hold the error back (see
    tests/test_gc_hygiene.py for why the service avoids cycles)."""
    await query(tool, "SELECT 1")
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        with pytest.raises(ToolError):
            await query(tool, "SELECT nope FROM orders")
        gc.collect()
        ours = [o for o in gc.garbage if isinstance(o, types.FrameType) and "query_database" in o.f_code.co_filename]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
    assert ours == []


async def test_load_tools_finds_the_builtin_tools(tmp_path: Path) -> None:
    tools = load_tools(tmp_path)
    try:
        assert {"query_database", "search_documents", "http_request"} <= set(tools)
        for tool in tools.values():
            schema = tool.input_schema()
            assert schema["type"] == "object" and schema["properties"]
            assert tool.description
    finally:
        for tool in tools.values():
            await tool.aclose()


# 26 CTEs that each add their column to itself: the query flattener copies each into the next while the statement
# compiles, doubling the expression at every level (2**26 terms, gigabytes), in one step nothing interrupts.
DOUBLING = "WITH a0(x) AS (SELECT 1), " + ", ".join(f"a{i}(x) AS (SELECT x + x FROM a{i - 1})" for i in range(1, 26))
DOUBLING += " SELECT x FROM a25"

MEASURE = """
import asyncio, json, resource, sys
from pathlib import Path

from tools import ToolConfig, ToolError
from tools.query_database import create

# A backstop for this test's own sake: a tool that let the query have its way would take the machine's memory.
resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))


def peak_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def main() -> None:
    tool = create(ToolConfig(data_dir=Path(sys.argv[1]), options={"timeout_s": 60}))
    await tool.run(tool.validate({"sql": "SELECT 1"}))
    before = peak_kib()
    try:
        await tool.run(tool.validate({"sql": sys.argv[2]}))
        error = "no error"
    except ToolError as exc:
        error = exc.message
    except MemoryError:
        error = "MemoryError"
    grown = peak_kib() - before
    await tool.aclose()
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"error": error, "grown_kib": grown, "children_kib": children}))


asyncio.run(main())
"""


async def test_a_query_that_asks_for_gigabytes_fails_at_once_and_the_process_stays_small(tmp_path: Path) -> None:
    """Measured in a child process: its peak RSS, and the peak of the query processes it started and reaped."""
    assert len(DOUBLING) < 1000
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-c", MEASURE, str(tmp_path), DOUBLING),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    measured = json.loads(out)
    assert "more than the 64 MiB of memory a query may use" in measured["error"], measured
    assert measured["grown_kib"] < 32 * 1024, measured  # the server's process: nothing of the query's memory
    assert measured["children_kib"] < (64 + 64) * 1024, measured  # the query's process: its heap limit, and Python
