"""The chaos harness's short round (`bench/chaos/`; `make chaos` runs the full minute): two real replicas on the real
Redis and PostgreSQL, runs in flight through them, a kill -9 or two, and every check of the harness: each run ends
SUCCEEDED, its log is gapless and the same from either replica, no recorded model turn is requested again, no
unsafe call reaches its upstream twice and one cut off is reported OUTCOME_UNKNOWN."""

from __future__ import annotations

from pathlib import Path

from backends import PostgresSchema, RedisNamespace

from bench.chaos.fleet import Backends
from bench.chaos.harness import Plan, render, run_chaos

SHORT = Plan(replicas=2, in_flight=4, duration_s=9, kill_every_s=4, restart_after_s=0.5, settle_s=25, seed=7)


async def test_runs_survive_kill_9_of_their_replica(
    tmp_path: Path, redis_ns: RedisNamespace, postgres_schema: PostgresSchema
) -> None:
    backends = Backends(redis_ns.url, redis_ns.prefix, postgres_schema.url)
    report = await run_chaos(tmp_path, backends, SHORT, say=lambda _: None)
    print(render(report, SHORT))
    assert report.kills >= 1
    assert report.recovered >= 1, "no kill caught a run in flight: the round proved nothing"
    assert report.by_kind == {}  # F1, F3–F6 (docs/chaos.md) are fixed: any violation fails
    assert report.states == {"SUCCEEDED": report.runs}
