"""`bench.sse_face` in smoke mode, end to end: the three systems take turns, each validated by a real client, and
the table and the JSON of every round are written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("fastapi", reason="bench extra not installed")
pytest.importorskip("psutil", reason="bench extra not installed")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_the_sse_face_bench_runs_all_three_systems(tmp_path: Path) -> None:
    out = tmp_path / "sse-face"
    done = subprocess.run(
        [sys.executable, "-m", "bench.sse_face", "--smoke", "--levels", "5", "--out", str(out)],
        cwd=ROOT,
        env=dict(os.environ, GRPC_VERBOSITY="ERROR"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    rows = results["levels"]["5"]
    assert set(rows) == {"service", "service-sse", "sse-async"}
    for system, row in rows.items():
        assert row["errors"] == 0 and row["calls"] > 0 and len(row["rounds"]) == 2, system
        assert row["ttfb_max_ms"] >= row["ttfb_mean_ms"] > 0, system
    assert "agent service, SSE face" in out.with_suffix(".md").read_text()
