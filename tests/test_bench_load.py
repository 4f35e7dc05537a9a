"""The Python load split over processes (`bench.run.run_load`): each process connects, they start together, and
the report joins every stream's record and flags saturation by the busiest process."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("psutil", reason="bench extra not installed")
pytest.importorskip("aiohttp", reason="bench load generator needs aiohttp")

from bench.procs import start  # noqa: E402
from bench.run import run_load  # noqa: E402
from bench.workload import Workload  # noqa: E402


def test_load_split_over_processes_reports_every_stream(tmp_path: Path) -> None:
    server = start("bare", Workload().unpaced(6), tmp_path)
    try:
        split = run_load(server, 5, 30.0, per_process=2)
        single = run_load(server, 3, 30.0)
    finally:
        server.stop()
    assert split["load_processes"] == 3  # 5 streams, at most 2 a process: 2 + 2 + 1
    records = split["records"]
    assert len(records) == 5
    assert all(r["error"] is None and r["events"] == 6 and r["first_token_s"] is not None for r in records)
    # the busiest process flags saturation; the total is every process's CPU
    assert split["load_cpu_total_s"] >= split["load_cpu_s"] > 0
    assert split["load_cpu_pct"] > 0
    assert single["load_processes"] == 1 and len(single["records"]) == 3
    assert single["load_cpu_total_s"] == single["load_cpu_s"]
