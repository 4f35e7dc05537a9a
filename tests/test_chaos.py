"""The chaos harness's short round (`bench/chaos/`; `make chaos` runs the full minute): two real replicas on the real
Redis and PostgreSQL, runs in flight through them, a kill -9 or two, and every check of the harness: each run ends
SUCCEEDED, its log is gapless and the same from either replica, no recorded model turn is requested again, no
unsafe call reaches its upstream twice and one cut off is reported OUTCOME_UNKNOWN."""

from __future__ import annotations

from pathlib import Path

import pytest
from backends import PostgresSchema, RedisNamespace

from bench.chaos.fleet import Backends
from bench.chaos.harness import Plan, render, run_chaos

# Violations found by the harness and open in the service (/work/notes/chaos-findings.md; docs/chaos.md): the test
# xfails when they are all it finds, and fails on any other. Temporary: each goes once issue 18's resume fixes it.
KNOWN_OPEN = {
    "seq_rewound": "F3: a caller sent seqs the dead replica had not shipped sees the new owner reuse them",
    "record_stuck": "F4: GetRun stays RUNNING for a run whose end a kill kept from the shared record",
    "lost_unstarted": "F5: a run admitted (SubmitRun answered) and lost when its replica died before it started",
}

SHORT = Plan(replicas=2, in_flight=4, duration_s=9, kill_every_s=4, restart_after_s=0.5, settle_s=25, seed=7)


async def test_runs_survive_kill_9_of_their_replica(
    tmp_path: Path, redis_ns: RedisNamespace, postgres_schema: PostgresSchema
) -> None:
    backends = Backends(redis_ns.url, redis_ns.prefix, postgres_schema.url)
    report = await run_chaos(tmp_path, backends, SHORT, say=lambda _: None)
    print(render(report, SHORT))
    assert report.kills >= 1
    assert report.recovered >= 1, "no kill caught a run in flight: the round proved nothing"
    unknown = {kind: texts for kind, texts in report.by_kind.items() if kind not in KNOWN_OPEN}
    assert unknown == {}
    if report.by_kind:
        kind, texts = next(iter(report.by_kind.items()))
        pytest.xfail(f"known open {KNOWN_OPEN[kind]}: {texts[0]}")
    assert report.states == {"SUCCEEDED": report.runs}
