"""`bench.retained` counts what ended runs keep: each of the runs it plays is kept (fewer than max_retained_runs),
so the counts per run are of kept runs, and a collected heap's leftovers from set-up do not show."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_counts_what_each_kept_run_holds() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.retained", "--runs", "60"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["runs"] == 60
    # a kept run is at least its Run, its log and its four events, and less than a kilobyte of objects
    assert 6 <= out["tracked_objects_per_run"] < 200
    assert 500 <= out["bytes_per_run"] < 64 * 1024
    assert out["gc_us_per_run"] >= 0
