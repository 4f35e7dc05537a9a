"""query_database against real SQLite files in tmp_path: reads work, every kind of write is refused by SQLite."""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from tools import ToolConfig, ToolError, load_tools
from tools.query_database import QueryDatabase, create


@pytest.fixture
def tool(tmp_path: Path) -> QueryDatabase:
    return create(ToolConfig(data_dir=tmp_path))


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
    forever = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    started = time.monotonic()
    with pytest.raises(ToolError, match=r"query took longer than 0\.2 s"):
        await query(tool, forever)
    assert time.monotonic() - started < 3


async def test_a_slow_query_does_not_hold_up_other_calls(tmp_path: Path) -> None:
    """One runaway query runs into its 0.5 s cap on its own worker thread while ten quick selects finish at once."""
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 0.5}))
    await query(tool, "SELECT 1")  # builds the demo database first
    forever = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    started = time.monotonic()
    slow = asyncio.create_task(query(tool, forever))
    await asyncio.sleep(0.05)
    quick = await asyncio.gather(
        *(query(tool, "SELECT count(*) FROM orders WHERE id > ?", params=[i]) for i in range(10))
    )
    quick_done = time.monotonic() - started
    assert len(quick) == 10 and all(r["row_count"] == 1 for r in quick)
    assert quick_done < 0.4 and not slow.done()
    with pytest.raises(ToolError, match=r"query took longer than 0\.5 s"):
        await slow
    assert 0.45 < time.monotonic() - started < 2


async def test_huge_values_and_results_are_capped(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"max_value_bytes": 4096, "max_result_bytes": 10_000}))
    with pytest.raises(ToolError, match="too big: values are limited to 4096 bytes"):
        await query(tool, "SELECT randomblob(1000000000)")
    result = await query(tool, "SELECT hex(randomblob(1000)) FROM orders", limit=1000)
    assert result["truncated"] is True and result["row_count"] == 5  # 2000 characters a row, 10 000 allowed


def test_oversized_sql_and_params_are_rejected(tool: QueryDatabase) -> None:
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT " + "1+" * 20_000 + "1"})
    with pytest.raises(ValidationError):
        tool.validate({"sql": "SELECT ?", "params": [1] * 101})


async def test_cancelling_a_call_stops_its_query(tmp_path: Path) -> None:
    tool = create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 5}))
    forever = "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n"
    task = asyncio.create_task(query(tool, forever))
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The worker thread is free again at once, well before the 5 s timeout: shutting the executor down does not wait.
    await asyncio.wait_for(asyncio.get_running_loop().shutdown_default_executor(), 1)


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
