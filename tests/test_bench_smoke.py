"""The benchmark's smoke mode, end to end, so that `bench/` never rots: every system runs, nothing errors, h2load's
streams were validated and its figures parsed, every round carries its load generator's CPU and saturation flag,
and the table and plots are written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
SYSTEMS = ("service", "bare", "sse-async", "sse-sync")

pytest.importorskip("fastapi", reason="bench extra not installed")
pytest.importorskip("uvicorn", reason="bench extra not installed")
pytest.importorskip("matplotlib", reason="bench extra not installed")
pytest.importorskip("psutil", reason="bench extra not installed")
pytest.importorskip("aiohttp", reason="bench load generator needs aiohttp")


def test_smoke_benchmark_runs_every_system_without_errors(tmp_path: Path) -> None:
    env = dict(os.environ, GRPC_VERBOSITY="ERROR")
    done = subprocess.run(
        # the replica stages need Redis and have their own test (tests/test_bench_replicas.py)
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path), "--stages", "main"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    table = (tmp_path / "results.md").read_text()
    assert results["rounds"] == 2
    assert results["machine"]["cpu_model"] and results["machine"]["cpu_model"] != "?"
    for system in SYSTEMS:
        rows = results["paced"][system]
        assert [r["streams"] for r in rows] == results["levels"]
        for row in rows:
            # the systems took turns for every round; the naive pattern, whose cut runs linger, ran once
            assert len(row["rounds"]) == (1 if system == "sse-sync" else results["rounds"])
            assert row["errors"] == 0, (system, row["error_kinds"])
            assert row["events"] > 0
            assert not row["censored"], (system, row["censored"])
            assert_saturation_flagged(row["rounds"], results["saturated_pct"])
    if shutil.which("h2load") is None:
        assert "nghttp2-client" in results["h2load"]["skipped"]
        assert "**Not run.**" in table
    else:
        check_h2load(results["h2load"], table)
    for row in results["unpaced"].values():
        assert row["service"]["errors"] == row["service-raw"]["errors"] == row["bare"]["errors"] == 0
        # coalescing off: one message per text delta, as the bare server sends them
        assert row["service-raw"]["events"] == row["bare"]["events"]
    for system, row in results["idle"].items():
        assert row["ready"] == row["streams"], system
    budget = results["start_budget"]
    assert [row["start_cpu_us"] for row in budget["rows"]] == [0, 200]
    assert all(row["errors"] == 0 and row["rounds"] == results["rounds"] for row in budget["rows"])
    assert budget["rows"][0]["ratio"] == 1.0  # the unchanged bare server against itself
    # in-process, a run's start costs the service more CPU than the bare servicer's first message
    assert budget["startcost"]["service_us"] > budget["startcost"]["bare_us"] > 0
    # live: every burst's streams all opened, and the server's CPU for them was read
    for system in ("service", "bare"):
        live = budget["live"][system]
        assert live["ready"] == budget["streams"] and live["rounds"] == results["rounds"]
        assert live["cpu_us_per_call"] > 0
    assert budget["live_ratio"] > 0
    stacks = results["overhead"]["stacks"]
    assert stacks["executor"]["p50_us"] > 0 and stacks["executor + SDK tracer (batch, null exporter)"]["p50_us"] > 0

    for label in (
        "agent service",
        "coalescing off",
        "bare grpc.aio",
        "FastAPI SSE, async gen",
        "FastAPI SSE, sync gen",
        "Start budget (C = 5)",
        "new streams that go quiet after their first event",
    ):
        assert label in table
    assert (tmp_path / "first_event_p99.png").stat().st_size > 0
    assert (tmp_path / "events_per_s.png").stat().st_size > 0


def assert_saturation_flagged(rounds: list[dict[str, Any]], limit: float) -> None:
    """Every round measured its load generator's CPU, and is flagged saturated exactly when it was above `limit`."""
    for r in rounds:
        assert 0 < r["load_cpu_pct"] < 400, r["load_cpu_pct"]
        assert r["saturated"] is (r["load_cpu_pct"] > limit)


def check_h2load(h2: dict[str, Any], table: str) -> None:
    assert h2["version"].startswith("h2load")
    paced = h2["paced"]
    for system in ("service", "bare", "sse-async"):
        # one stream of the very request h2load posts went through a real client: status OK and the whole timeline
        valid = paced["validation"][system]
        assert valid["status"] in ("OK", "200") and valid["events"] > 3 and valid["body_bytes"] > 0, valid
        for row in paced["rows"][system]:
            assert row["errors"] == 0 and row["succeeded"] == row["calls"] > 0, (system, row["error_kinds"])
            assert 0 < row["ttfb_min_ms"] <= row["ttfb_mean_ms"] <= row["ttfb_max_ms"] < 10_000
            assert 0 < row["req_p50_ms"] <= row["req_p99_ms"] <= row["req_max_ms"] * 1.001
            assert row["req_per_s"] > 0 and row["server_cpu_us_per_call"] > 0
            # h2load read whole streams: as many body bytes as the validated stream (timestamps vary in size)
            assert row["body_bytes_per_stream"] == pytest.approx(valid["body_bytes"], rel=0.2)
            assert len(row["rounds"]) == 2
            assert_saturation_flagged(row["rounds"], h2["saturated_pct"])
    for part, service, key in (
        ("start", "service", "server_cpu_us_per_call"),
        ("event", "service-raw", "server_cpu_us_per_added_event"),
    ):
        rows = h2["cpu"][part]["rows"]
        for system in (service, "bare"):
            assert rows[system][key] > 0 and rows[system]["errors"] == 0
            assert_saturation_flagged(rows[system]["rounds"], h2["saturated_pct"])
        flagged = any(r["saturated"] for r in rows[service]["rounds"] + rows["bare"]["rounds"])
        assert h2["cpu"][part]["ratio"] is not None or flagged
    assert "h2load: time to first byte" in table and "Server CPU per call start and per event" in table
    check_workers_sse(h2["workers_sse"], table, h2["saturated_pct"])


def check_workers_sse(ws: dict[str, Any], table: str, saturated_pct: float) -> None:
    """The service with --workers 2 (redis://) against FastAPI SSE: skipped only where no Redis answers, and never
    under CI (`AGENT_REQUIRE_BACKENDS=1`), whose machines run one."""
    if "skipped" in ws:
        assert "Redis" in ws["skipped"] and os.environ.get("AGENT_REQUIRE_BACKENDS") != "1", ws["skipped"]
        return
    assert ws["validation"]["service"]["status"] == "OK" and ws["keys_deleted"] > 0  # its workers wrote to Redis
    for name, rows in ws["rows"].items():
        for row in rows:
            assert row["errors"] == 0 and row["succeeded"] == row["calls"] > 0, (name, row["error_kinds"])
            assert not any(r["failed"] for r in row["rounds"]) and len(row["rounds"]) == 2
            assert_saturation_flagged(row["rounds"], saturated_pct)
    for goals in ws["goals"].values():
        assert [len(g["ratios"]) + g["left_out"] for g in goals.values()] == [2, 2]
    assert "### --workers 2 against FastAPI SSE (h2load)" in table and "| agent service, --workers 2 | 5 |" in table
