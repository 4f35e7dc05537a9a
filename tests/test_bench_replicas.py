"""The replica benchmarks (`bench.replicas`): their goal verdicts on made-up rounds, and their smoke mode end to end
against the real Redis (redis:// against memory://, two workers against one, durable runs against none), so that
`make bench`'s issue 16 and 18 stages do not rot."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from backends import RedisNamespace

pytest.importorskip("psutil", reason="bench extra not installed")

from bench.replicas import goal  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def rows(*values: float, saturated: tuple[int, ...] = (), failed: tuple[int, ...] = ()) -> dict[str, Any]:
    rounds = [{"streams_per_s": v, "saturated": i in saturated, "failed": i in failed} for i, v in enumerate(values)]
    return {"rounds": rounds}


def test_a_goal_reads_the_median_of_the_per_round_ratios() -> None:
    # a noisy middle round for both systems: per round the candidate does 1.6x, 1.6x, 1.4x the baseline's streams/s
    met = goal("streams/s", "streams_per_s", 1.5, True, rows(160, 80, 140), rows(100, 50, 100))
    assert met["ratio"] == pytest.approx(1.6)
    assert met["verdict"] == "pass (2/3 rounds meet it)" and met["value"] == "1.60 (1.40–1.60)"
    missed = goal("streams/s", "streams_per_s", 1.5, True, rows(120, 60, 130), rows(100, 50, 100))
    assert missed["verdict"] == "**miss**"
    # at most 1.3x: lower is better; a bound of 1 asks for strictly lower
    assert goal("ttfb", "streams_per_s", 1.3, False, rows(12, 13), rows(10, 10))["verdict"] == "pass"
    assert goal("ttfb", "streams_per_s", 1.0, False, rows(10, 11), rows(10, 10))["verdict"] == "**miss**"
    assert goal("ttfb", "streams_per_s", 1.0, False, rows(9, 9), rows(10, 10))["verdict"] == "pass"


def test_saturated_rounds_and_rounds_with_failed_streams_leave_a_goal() -> None:
    # the round in which h2load was saturated (on either side) would have said "miss"
    kept = goal("streams/s", "streams_per_s", 1.5, True, rows(160, 50, 170, saturated=(1,)), rows(100, 100, 100))
    assert kept["ratios"] == pytest.approx([1.6, 1.7]) and kept["left_out"] == 1
    assert kept["verdict"] == "pass, 1/3 rounds left out"
    # refused calls end at once: the baseline's round with failed streams would have read 3x
    failed = goal("streams/s", "streams_per_s", 1.5, True, rows(120, 300, 130), rows(100, 100, 100, failed=(1,)))
    assert failed["ratios"] == pytest.approx([1.2, 1.3]) and failed["verdict"] == "**miss**, 1/3 rounds left out"
    gone = goal("streams/s", "streams_per_s", 1.5, True, rows(160, 150), rows(100, 100, saturated=(0,), failed=(1,)))
    assert gone["ratio"] is None and gone["verdict"].startswith("not run")


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
async def test_smoke_run_pairs_redis_with_memory_and_two_workers_with_one(
    tmp_path: Path, redis_ns: RedisNamespace
) -> None:
    out = tmp_path / "replicas.md"
    cmd = [sys.executable, "-m", "bench.replicas", "--smoke", "--out", str(out)]
    cmd += ["--redis-url", redis_ns.url, "--prefix", redis_ns.prefix]
    done = await asyncio.to_thread(
        subprocess.run,
        cmd,
        cwd=ROOT,
        env=dict(os.environ, GRPC_VERBOSITY="ERROR"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(out.with_suffix(".json").read_text())
    assert results["machine"]["cpu_model"] and results["keys_deleted"] > 0  # the Redis servers wrote under the prefix
    expected = {"state": {"memory", "redis"}, "workers": {"workers-1", "workers-2"}, "durable": {"memory", "durable"}}
    for name, comparison in results["comparisons"].items():
        for level in comparison["levels"].values():
            assert set(level["rows"]) == expected.pop(name)
            for row in level["rows"].values():
                assert row["errors"] == 0 and row["succeeded"] == row["calls"] > 0
                assert row["streams_per_s"] > 0 and row["server_cpu_us_per_call"] > 0
                # every stream h2load counted, the service completed OK (h2load reads no trailers)
                assert all(r["failed_streams"] == 0 and not r["failed"] for r in row["rounds"])
                for r in row["rounds"]:
                    assert "loadavg_1m" in r and 0 < r["load_cpu_pct"] < 400
                    assert r["saturated"] is (r["load_cpu_pct"] > results["saturated_pct"])
            # every round read the Redis server's CPU, the memory:// ones too (Redis may have other clients)
            assert all("redis_cpu_us_per_call" in r for row in level["rows"].values() for r in row["rounds"])
            for g in level["goals"]:
                assert len(g["ratios"]) + g["left_out"] == 2 and g["verdict"], g
    assert not expected, f"comparisons not run: {expected}"
    table = out.read_text()
    assert "## Shared state: redis:// ÷ memory://, C = 5" in table
    assert "## Workers: --workers 2 ÷ 1 worker (both redis://), C = 5" in table
    assert "| completed streams/s ≥ 1.5× |" in table
    assert "## Durable runs: every run checkpointed (SQLite) ÷ none (both memory://), C = 5" in table
    cost = results["comparisons"]["durable"]["levels"]["5"]["checkpoint"]
    assert cost["rows"] > 0 and cost["bytes"] > 0  # the durable server's runs were checkpointed
