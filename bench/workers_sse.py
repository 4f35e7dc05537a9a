"""Issue 15's last FastAPI SSE target: the service with `--workers 2` against FastAPI SSE (async generator, one uvicorn
process) at C = 1000, "clearly better". Workers need shared state, so the service runs on `state.url: redis://` (as
`bench.replicas`'s two-worker variant does, under a fresh key prefix deleted at the end).

The two take turns through h2load as the paced stage's systems do (`bench.h2bench`: its rounds, loads and row), each
server's first stream validated by a real client. h2load reads no trailers, so each of the service's rounds is also
checked against the runs it completed OK (its /metrics, all workers'), as `bench.replicas` does: a round in which
streams failed, or in which h2load was saturated, leaves the ratios.
"""

from __future__ import annotations

import contextlib
import secrets
from functools import partial
from pathlib import Path
from typing import Any

from bench import h2bench, h2load, stats
from bench.plan import Plan, say, take_turns
from bench.procs import Server, start
from bench.redisbench import REDIS_URL, delete_keys, redis_answers
from bench.replicas import TWO, goal, runs_ok, settled_ok

LEVELS = (1000,)
# "clearly better", which the issue leaves without a figure: the service's time to first byte at most this share of
# FastAPI SSE's (the median of the per-round ratios), not merely below it
CLEARLY = 0.8
SERVICE, SSE = "service-workers-2", "sse-async"
STATS = ("mean", "max")


class Checked(h2bench.Rounds):
    """`h2bench.Rounds`, and for the service the streams it did not complete OK (`failed_streams`): a refused call
    ends at once and would flatter its time to first byte."""

    def __call__(self, server: Server, c: int, deadline: float) -> dict[str, Any]:
        if server.metrics_port is None:  # FastAPI SSE: its stream either comes whole or h2load counts it failed
            return super().__call__(server, c, deadline) | {"failed_streams": 0, "failed": False}
        if server.system not in self.validated:  # before `before`: the validating stream is a run too
            self.validated[server.system] = h2load.validate(server, self.body, self.workload, False, self.deadline)
        before = runs_ok(server)
        row = super().__call__(server, c, deadline)
        failed = max(0, row["calls"] - settled_ok(server, before, row["calls"]))
        if failed:
            row["errors"] += failed
            row["error_kinds"]["not OK (the service's completed runs)"] = failed
        return row | {"failed_streams": failed, "failed": failed > 0}


def goals(service: dict[str, Any], sse: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The target on the time to first byte's mean and max: the median of the per-round ratios at most `CLEARLY`,
    from the rounds in which neither side had h2load saturated or streams failed (`bench.replicas.goal`)."""
    return {s: goal(f"time to first byte, {s}", f"ttfb_{s}_ms", CLEARLY, False, service, sse) for s in STATS}


def stage(plan: Plan, workdir: Path, path: str, redis_url: str = REDIS_URL) -> dict[str, Any]:
    """The paired rounds at C = 1000 (the smoke plan's h2load level in smoke mode), or a note saying why not."""
    why = redis_answers(redis_url)
    if why is not None:
        note = f"--workers 2 against FastAPI SSE skipped: {why} (workers need `state.url: redis://`)"
        say(note)
        return {"skipped": note}
    body = h2load.request_file(workdir)
    levels = (plan.h2load_levels or (5,)) if plan.mode == "smoke" else LEVELS
    prefix = f"bench:{secrets.token_hex(4)}:"
    out: dict[str, Any] = {"levels": list(levels), "rows": {SERVICE: [], SSE: []}, "goals": {}, "validation": {}}
    try:
        for c in levels:
            measure = Checked(path, body, plan.workload, partial(h2bench.paced_loads, plan), plan.deadline_s)
            config = TWO.config(redis_url, prefix)
            starters = {
                SERVICE: partial(start, "service", plan.workload, workdir / SERVICE, config=config),
                SSE: partial(start, SSE, plan.workload, workdir / SSE),
            }
            rounds = take_turns(starters, c, plan, measure)
            out["validation"] |= measure.validated
            rows = {name: stats.combine(r) for name, r in rounds.items()}
            for name, r in rows.items():
                out["rows"][name].append(r)
                say(
                    f"h2load {name:17} C={c:<5} ttfb mean {r['ttfb_mean_ms']:7.1f} max {r['ttfb_max_ms']:7.1f} ms, "
                    f"h2load {r['load_cpu_pct']:3.0f} % CPU, errors {r['errors']} (median of {len(r['rounds'])})"
                )
            out["goals"][str(c)] = goals(rows[SERVICE], rows[SSE])
            for g in out["goals"][str(c)].values():
                say(f"  C={c} --workers 2 ÷ FastAPI SSE, {g['goal']}: {g['value']} ({g['verdict']})")
    finally:
        with contextlib.suppress(Exception):  # the keys expire by TTL anyway
            out["keys_deleted"] = delete_keys(redis_url, prefix)
    return out
