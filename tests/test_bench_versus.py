"""Old against new (`bench.versus`): its verdicts on made-up rounds, and its smoke mode end to end with this checkout
playing both versions, so that the paired run that closes a structure change does not rot."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("psutil", reason="bench extra not installed")

from bench.versus import compare  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def rows(*values: float, saturated: tuple[int, ...] = ()) -> dict[str, Any]:
    rounds = [{"ttfb_mean_ms": v, "load_cpu_pct": 80.0 if i in saturated else 20.0} for i, v in enumerate(values)]
    for i, r in enumerate(rounds):
        r["saturated"] = i in saturated
    return {"ttfb_mean_ms": sorted(values)[len(values) // 2], "rounds": rounds}


def test_new_reads_slower_only_when_every_round_says_so() -> None:
    # round 2 was a noisy spell for both: per round new is 1.1x, 1.1x, 1.2x old
    slower = compare("ttfb", "ttfb_mean_ms", rows(10, 100, 10), rows(11, 110, 12), "ms")
    assert slower["ratios"] == pytest.approx([1.1, 1.1, 1.2])
    assert slower["ratio"] == pytest.approx(1.1) and slower["verdict"] == "**new slower**"
    # one round in which new was faster: the spread holds 1, so no verdict either way
    mixed = compare("ttfb", "ttfb_mean_ms", rows(10, 100, 10), rows(11, 90, 12), "ms")
    assert mixed["ratio"] == pytest.approx(1.1) and mixed["verdict"] == "within the spread"
    faster = compare("ttfb", "ttfb_mean_ms", rows(10, 100, 10), rows(9, 95, 8), "ms")
    assert faster["verdict"] == "new faster"


def test_saturated_rounds_leave_the_ratio() -> None:
    # the round in which h2load was saturated on either side said "faster"; the others say "slower"
    row = compare("ttfb", "ttfb_mean_ms", rows(10, 10, 10), rows(12, 5, 12, saturated=(1,)), "ms")
    assert row["ratios"] == pytest.approx([1.2, 1.2]) and row["saturated"] == 1 and row["rounds"] == 3
    assert row["verdict"] == "**new slower**" and row["load_cpu_pct_max"] == 80.0
    gone = compare("ttfb", "ttfb_mean_ms", rows(10, 10), rows(12, 12, saturated=(0, 1)), "ms")
    assert gone["ratio"] is None and gone["verdict"].startswith("not run")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_smoke_run_of_a_checkout_against_itself(tmp_path: Path) -> None:
    out = tmp_path / "versus.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench.versus", str(ROOT), str(ROOT), "--smoke", "--out", str(out), "--stages"]
        + ["paced,cpu,overhead,pyload"],
        cwd=ROOT,
        env=dict(os.environ, GRPC_VERBOSITY="ERROR"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["checkouts"]["old"]["commit"] == results["checkouts"]["new"]["commit"]
    for level in results["paced"].values():
        for row in level.values():
            assert row["errors"] == 0 and row["succeeded"] == row["calls"] > 0
            assert len(row["rounds"]) == 2 and all("loadavg_1m" in r for r in row["rounds"])
    for level in results["pyload"].values():  # the Python load's rounds, both checkouts, every stream complete
        for row in level.values():
            assert row["errors"] == 0 and len(row["rounds"]) == 2 and row["first_token_p99_ms"] > 0
    figures = {row["figure"]: row for row in results["comparisons"]}
    assert len(figures) == 8 + 3 * len(results["pyload"])
    for name, row in figures.items():
        assert row["rounds"] == 2 and row["old"] > 0 and row["new"] > 0, name
        assert len(row["ratios"]) + row["saturated"] == 2, name
    table = out.read_text()
    assert "| time to first byte, mean, C=5 |" in table and "| tool-call overhead p50 |" in table
