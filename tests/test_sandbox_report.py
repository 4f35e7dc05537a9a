"""shipment_report, the example sandboxed tool: a real report over the demo database, made by a program running as
the sandbox user from a root-only data folder, through the executor and over gRPC."""

from __future__ import annotations

import hashlib
import sqlite3
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from agent.v1 import agent_pb2 as pb
from conftest import run_events, stub
from fake_tools import all_tools
from tools import ToolConfig, ToolError, load_tools
from tools.shipment_report import ShipmentReport, create

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux only")


@pytest.fixture
def tool(tmp_path: Path) -> ShipmentReport:
    return create(ToolConfig(data_dir=tmp_path))


async def report(tool: ShipmentReport, **args: Any) -> Any:
    return await tool.run(tool.validate(args))


def private(folder: Path) -> None:
    folder.chmod(0o700)


def file_names(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def late_by_carrier(db: Path) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        as_of = conn.execute("SELECT MAX(MAX(shipped_at), MAX(COALESCE(delivered_at, ''))) FROM shipments").fetchone()
        rows = conn.execute(
            "SELECT c.name, COUNT(*) FROM shipments s JOIN carriers c ON c.id = s.carrier_id"
            " WHERE s.status IN ('delayed', 'exception') OR COALESCE(s.delivered_at, ?) > s.promised_at"
            " GROUP BY c.name",
            as_of,
        )
        return dict(rows.fetchall())


async def test_late_shipments_per_carrier_from_the_demo_database(tool: ShipmentReport, tmp_path: Path) -> None:
    private(tmp_path)  # the sandbox user cannot read the data folder: the tool stages a copy
    result = await report(tool)
    expected = late_by_carrier(tmp_path / "demo.db")
    assert {c["carrier"]: c["matching"] for c in result["carriers"]} == expected
    assert result["matching"] == sum(expected.values()) > 0
    assert result["status"] == "late" and result["as_of"].startswith("2026-11")
    worst = result["carriers"][0]
    assert worst["matching"] == max(expected.values())
    assert 0 < len(worst["worst"]) <= 5
    delays = [s["delay_h"] for s in worst["worst"]]
    assert delays == sorted(delays, reverse=True) and worst["worst_delay_h"] == delays[0]
    assert {"tracking_number", "status", "promised_at", "delay_reason"} <= set(worst["worst"][0])


def with_status(db: Path, status: str) -> dict[str, int]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT c.name, COUNT(*) FROM shipments s JOIN carriers c ON c.id = s.carrier_id WHERE s.status = ?"
            " GROUP BY c.name",
            (status,),
        )
        return dict(rows.fetchall())


async def test_carrier_filter_status_and_top(tool: ShipmentReport, tmp_path: Path) -> None:
    result = await report(tool, carrier="sky", status="all", top=2)
    assert [c["carrier"] for c in result["carriers"]] == ["SkyBridge Air Cargo"]
    sky = result["carriers"][0]
    assert sky["matching"] == sky["shipments"] and len(sky["worst"]) == 2
    exceptions = await report(tool, status="exception")
    expected = with_status(tmp_path / "demo.db", "exception")
    assert len(expected) > 1  # the demo database has exceptions at several carriers, and other statuses besides
    assert {c["carrier"]: c["matching"] for c in exceptions["carriers"]} == expected
    assert [s["status"] for c in exceptions["carriers"] for s in c["worst"]] == ["exception"] * sum(expected.values())


async def test_unknown_carrier_is_an_error_the_model_can_act_on(tool: ShipmentReport) -> None:
    with pytest.raises(ToolError, match=r"no carrier matches 'Zeppelin'; the carriers are: .*SwiftParcel"):
        await report(tool, carrier="Zeppelin")


async def test_the_database_is_not_changed(tool: ShipmentReport, tmp_path: Path) -> None:
    await report(tool)
    db = tmp_path / "demo.db"
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    await report(tool, status="all")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
    assert file_names(tmp_path) == ["demo.db"]


async def test_configured_database_and_options(tmp_path: Path) -> None:
    missing = create(ToolConfig(data_dir=tmp_path, options={"db_path": str(tmp_path / "nope.db"), "timeout_s": 5}))
    assert missing.options.timeout_s == 5
    with pytest.raises(ToolError, match="the database nope.db is not there"):
        await report(missing)
    with pytest.raises(ValidationError):
        create(ToolConfig(data_dir=tmp_path, options={"memory_mb": 1}))
    with pytest.raises(ValidationError):
        create(ToolConfig(data_dir=tmp_path, options={"no_such_option": 1}))


def test_input_schema_and_discovery(tmp_path: Path) -> None:
    tools = load_tools(tmp_path, {"shipment_report": {"cpu_s": 2}})
    assert isinstance(tools["shipment_report"], ShipmentReport)
    assert tools["shipment_report"].sandbox.options.cpu_s == 2
    schema = tools["shipment_report"].input_schema()
    assert set(schema["properties"]) == {"carrier", "status", "top"}
    with pytest.raises(ValidationError):
        tools["shipment_report"].validate({"status": "lost"})
    with pytest.raises(ValidationError):
        tools["shipment_report"].validate({"db": "/etc/shadow"})  # the database is the tool's choice, not the model's


async def test_over_grpc(start_service: Any, channel_to: Any, tmp_path: Path) -> None:
    turns = [{"tool_calls": [{"name": "shipment_report", "input": {"carrier": "swift"}}]}, {"text": "{results}"}]
    svc = await start_service(turns, tools={"shipment_report": create(ToolConfig(data_dir=tmp_path / "data"))})
    events = await run_events(channel_to(svc), message="Which carrier is late?")
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.status == pb.TOOL_STATUS_OK, result.error
    carriers = result.data.struct_value["carriers"]
    assert [c["carrier"] for c in carriers] == ["SwiftParcel"]
    assert events[-1].HasField("final_response")


async def test_a_tool_that_cannot_work_here_is_left_out_and_refused(
    start_service: Any, channel_to: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # No interpreter the sandbox user can run: the service starts all the same, says so once, and leaves it out.
    broken = create(ToolConfig(data_dir=tmp_path, options={"python": str(tmp_path / "no-python-here")}))
    assert broken.unavailable is not None and "no Python interpreter" in broken.unavailable
    turns = [{"tool_calls": [{"name": "shipment_report", "input": {}}, {"name": "echo", "input": {"text": "hi"}}]}]
    svc = await start_service([*turns, {"text": "{results}"}], tools={**all_tools(), "shipment_report": broken})
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and "unavailable" in r.getMessage()]
    assert warnings == [
        f"tool shipment_report is unavailable on this server and left out of ListTools: {broken.unavailable}"
    ]
    channel = channel_to(svc)
    listed = await stub(channel).ListTools(pb.ListToolsRequest())
    assert "shipment_report" not in {t.name for t in listed.tools} and "echo" in {t.name for t in listed.tools}
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run_events(channel, message="report", tools=["echo", "shipment_report"])
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert refused.value.details() == f"tool shipment_report is unavailable on this server: {broken.unavailable}"
    events = await run_events(channel, message="report")  # the default tools: the available ones
    assert "shipment_report" not in events[0].run_started.tools
    assert [e.tool_result.name for e in events if e.HasField("tool_result")] == ["echo"]
    assert events[-1].HasField("final_response")
    with pytest.raises(ToolError, match="shipment_report is unavailable on this server: no Python interpreter"):
        await report(broken)  # as a fallback of another tool would call it
