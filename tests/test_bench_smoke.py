"""The benchmark's smoke mode, end to end, so that `bench/` never rots: every system runs, nothing errors, and the
table and plots are written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

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
        [sys.executable, "-m", "bench", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    results = json.loads((tmp_path / "results.json").read_text())
    assert results["rounds"] == 2
    for system in SYSTEMS:
        rows = results["paced"][system]
        assert [r["streams"] for r in rows] == results["levels"]
        for row in rows:
            # the systems took turns for every round; the naive pattern, whose cut runs linger, ran once
            assert len(row["rounds"]) == (1 if system == "sse-sync" else results["rounds"])
            assert row["errors"] == 0, (system, row["error_kinds"])
            assert row["events"] > 0
            assert not row["censored"], (system, row["censored"])
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

    table = (tmp_path / "results.md").read_text()
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
