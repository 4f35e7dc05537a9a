"""The replica benchmarks of issue 16: the same checkout's service under two configs, taking turns through h2load.

    python -m bench.replicas [--smoke] [--out FILE.md] [--redis-url URL] [--prefix PREFIX] [--stages state,workers]

- *state*: `state.url: redis://…` against `memory://` at C = 100 and 1000. Goals: time to first byte ≤ 1.3×,
  events/s ≥ 0.7×.
- *workers*: `--workers 2` against one worker, both on the Redis state, at C = 1000. Goals: completed streams/s
  ≥ 1.5×, time to first byte lower.
- *durable* (issue 18): every run durable (checkpoints in the embedded SQLite file) against none, both memory://,
  at C = 100 and 1000. Goals: time to first byte ≤ 1.3×, events/s ≥ 0.7×; the extra server CPU and the file's bytes
  per checkpoint write are reported.

A round on one server is two h2load runs of the paced workload: C streams on C connections (the time to first byte,
h2load's per connection), then `WAVES` × C streams on the same C connections one after the other, so that C streams
stay in flight and new ones start as others end (completed streams/s, events/s, request times). Every Redis server
runs under a fresh `state.prefix`, whose keys are deleted at the end. Each server is validated by a real client before
its first round; the pairing, ratios and saturation flags are `bench.versus`'s (method in bench/README.md).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import secrets
import sqlite3
import statistics
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench import h2bench, h2load, stats
from bench.h2load import Load
from bench.plan import PLANS, SATURATED_PCT, Plan, say, take_turns
from bench.procs import ROOT, Server, start
from bench.redisbench import REDIS_URL, delete_keys, redis_answers, redis_cpu_s, redis_version
from bench.replicas_report import markdown
from bench.workload import Workload, timeline

WAVES = 3  # streams per connection in the sustained run: C in flight, each connection starting its next as one ends
STAGES = ("state", "workers", "durable")
# what a durable run of the paced workload writes, each committed before it goes on: the run's row, turn 1, the
# intent of its (unsafe) tool call, the call's result, turn 2, the run's end
CHECKPOINTS_PER_RUN = 6
OK_RUNS = 'agent_runs_total{outcome="OK"}'


@dataclass(frozen=True)
class Variant:
    """One config of the service: where its state lives and how many worker processes serve."""

    name: str
    label: str
    redis: bool
    workers: int = 1
    durable: bool = False  # every run checkpointed (the anonymous caller's default; h2load sends one request)

    def config(self, redis_url: str, prefix: str) -> dict[str, Any]:
        state = {"url": redis_url, "prefix": f"{prefix}{self.name}:"} if self.redis else {"url": "memory://"}
        durable = {"auth": {"anonymous": {"name": "anonymous", "durability": "durable"}}} if self.durable else {}
        return {"state": state, "workers": self.workers, **durable}


@dataclass(frozen=True)
class Comparison:
    """A candidate against a baseline at some levels, and the goals the issue sets: (label, key, bound, higher)
    where `higher` means the candidate must be at least `bound` times the baseline, else at most."""

    name: str
    title: str
    candidate: Variant
    baseline: Variant
    levels: tuple[int, ...]
    goals: tuple[tuple[str, str, float, bool], ...]


MEMORY = Variant("memory", "memory://", redis=False)
REDIS = Variant("redis", "redis://", redis=True)
ONE = Variant("workers-1", "1 worker, redis://", redis=True)
TWO = Variant("workers-2", "--workers 2, redis://", redis=True, workers=2)
DURABLE = Variant("durable", "durable (SQLite checkpoints), memory://", redis=False, durable=True)
# the goals of a backend that must cost little (issues 16 and 18): first byte at most 1.3x, events/s at least 0.7x
AT_SIMILAR_COST = (
    ("time to first byte, max (stands for p99)", "ttfb_max_ms", 1.3, False),
    ("time to first byte, mean", "ttfb_mean_ms", 1.3, False),
    ("events/s", "events_per_s", 0.7, True),
)
COMPARISONS = {
    "state": Comparison(
        "state",
        "Shared state: redis:// ÷ memory://",
        REDIS,
        MEMORY,
        (100, 1000),
        AT_SIMILAR_COST,
    ),
    "workers": Comparison(
        "workers",
        "Workers: --workers 2 ÷ 1 worker (both redis://)",
        TWO,
        ONE,
        (1000,),
        (
            ("completed streams/s", "streams_per_s", 1.5, True),
            ("time to first byte, max (stands for p99)", "ttfb_max_ms", 1.0, False),
            ("time to first byte, mean", "ttfb_mean_ms", 1.0, False),
        ),
    ),
    "durable": Comparison(
        "durable",
        "Durable runs: every run checkpointed (SQLite) ÷ none (both memory://)",
        DURABLE,
        MEMORY,
        (100, 1000),
        AT_SIMILAR_COST,
    ),
}
# every figure of the tables, the candidate ÷ the baseline: (label, key, unit)
FIGURES = (
    ("time to first byte, mean", "ttfb_mean_ms", "ms"),
    ("time to first byte, max", "ttfb_max_ms", "ms"),
    ("request p50 (sustained)", "req_p50_ms", "ms"),
    ("request p99 (sustained)", "req_p99_ms", "ms"),
    ("completed streams/s", "streams_per_s", "/s"),
    ("events/s", "events_per_s", "/s"),
    ("server CPU per stream (all processes)", "server_cpu_us_per_call", "µs"),
    ("Redis CPU per stream", "redis_cpu_us_per_call", "µs"),
)


def loads(c: int, proto: str) -> list[Load]:
    """The time to first byte (C streams on C connections), then `WAVES` × C on C connections, one at a time each."""
    return [Load(c, c, 1), Load(WAVES * c, c, 1)]


class Measure:
    """One round on one server (the measure for `take_turns`): before the server's first round one stream through a
    real client; then h2load runs `loads(c)`. h2load reads no trailers, so a call the service refused (HTTP 200,
    then UNAVAILABLE in the trailers) counts as a success there: each run's streams are checked against the runs the
    service completed with status OK (`agent_runs_total{outcome="OK"}` on its /metrics, all workers'), and the
    shortfall is the round's `failed_streams`. Completed streams/s count only those. A round with failed streams
    measures the failures (a refused call ends at once) and leaves the ratios, as a saturated one does."""

    def __init__(self, path: str, body: Path, workload: Workload, deadline: float, redis_url: str) -> None:
        self.path, self.body, self.workload, self.deadline, self.redis_url = path, body, workload, deadline, redis_url
        self.events_per_stream = len(timeline(workload))
        self.validated: dict[int, dict[str, Any]] = {}

    def __call__(self, server: Server, c: int, deadline: float) -> dict[str, Any]:
        if server.port not in self.validated:
            self.validated[server.port] = h2load.validate(server, self.body, self.workload, False, self.deadline)
        time.sleep(0.3)  # the previous round's connections are closed
        cpu0, redis0 = server.cpu_s(), redis_cpu_s(self.redis_url)
        runs, ok = [], []
        for load in loads(c, server.proto):
            before = runs_ok(server)
            runs.append(h2load.run(self.path, server, self.body, load, deadline))
            ok.append(settled_ok(server, before, runs[-1]["requests"]["total"]))
        cpu, redis1 = server.cpu_s() - cpu0, redis_cpu_s(self.redis_url)
        row = h2bench.row(runs, cpu, self.events_per_stream, c)
        failed = sum(r["requests"]["total"] for r in runs) - sum(ok)
        if failed:
            row["errors"] += failed
            row["error_kinds"]["not OK (the service's completed runs)"] = failed
        row["failed_streams"] = failed
        row["failed"] = failed > 0
        row["streams_per_s"] = ok[-1] / runs[-1]["finished_s"]
        row["events_per_s"] = row["streams_per_s"] * self.events_per_stream
        row["loadavg_1m"] = os.getloadavg()[0]
        if redis0 is not None and redis1 is not None:
            row["redis_cpu_us_per_call"] = (redis1 - redis0) / row["calls"] * 1e6
        return row


def runs_ok(server: Server) -> int:
    """How many runs the service has completed with status OK, from its /metrics."""
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return int(sum(float(line.rpartition(" ")[2]) for line in text.splitlines() if line.startswith(OK_RUNS)))


def settled_ok(server: Server, before: int, calls: int, within_s: float = 5.0) -> int:
    """The runs completed OK since `before`, once all `calls` are or the count stops moving (a run is counted as it
    settles, just after its stream ends)."""
    deadline = time.monotonic() + within_s
    last = -1
    while True:
        done = runs_ok(server) - before
        if done >= calls or done == last or time.monotonic() > deadline:
            return done
        last = done
        time.sleep(0.2)


def levels_for(plan: Plan, comparison: Comparison) -> tuple[int, ...]:
    if plan.mode == "smoke":
        return plan.h2load_levels or (5,)
    return comparison.levels


def compare(
    plan: Plan, workdir: Path, path: str, comparison: Comparison, redis_url: str, prefix: str
) -> dict[str, Any]:
    """Both variants of `comparison` at each of its levels, taking turns; their rows and per-round ratios."""
    body = h2load.request_file(workdir)
    variants = (comparison.baseline, comparison.candidate)
    out: dict[str, Any] = {"title": comparison.title, "levels": {}}
    for c in levels_for(plan, comparison):
        measure = Measure(path, body, plan.workload, plan.deadline_s, redis_url)
        starters = {
            v.name: partial(start, "service", plan.workload, workdir / v.name, config=v.config(redis_url, prefix))
            for v in variants
        }
        rows = {name: stats.combine(r) for name, r in take_turns(starters, c, plan, measure).items()}
        base, cand = rows[comparison.baseline.name], rows[comparison.candidate.name]
        figures = [figure(label, key, unit, cand, base) for label, key, unit in FIGURES if key in base["rounds"][0]]
        goals = [goal(label, key, bound, higher, cand, base) for label, key, bound, higher in comparison.goals]
        out["levels"][str(c)] = {"rows": rows, "figures": figures, "goals": goals}
        if comparison.candidate.durable:
            out["levels"][str(c)]["checkpoint"] = checkpoint_cost(cand, base, workdir / comparison.candidate.name)
        for v in variants:
            r = rows[v.name]
            say(
                f"{comparison.name} {v.name:9} C={c:<5} ttfb mean {r['ttfb_mean_ms']:7.1f} max {r['ttfb_max_ms']:7.1f} "
                f"ms, {r['streams_per_s']:6.0f} streams/s, {r['server_cpu_us_per_call']:6.0f} µs CPU/stream, "
                f"h2load {r['load_cpu_pct']:3.0f} %, errors {r['errors']} (median of {len(r['rounds'])})"
            )
        for g in goals:
            say(f"  C={c} {g['goal']}: {g['value']} ({g['verdict']})")
    return out


def checkpoint_cost(cand: dict[str, Any], base: dict[str, Any], workdir: Path) -> dict[str, float]:
    """The durable server's extra CPU per checkpoint write (the medians' difference per stream, over the writes of a
    run), and the checkpoint tables' bytes per write so far (every level's runs are in them: it is cumulative). The
    file also holds the run log (its events), since one transaction writes both: `log_bytes` per checkpoint row."""
    extra_us = (cand["server_cpu_us_per_call"] - base["server_cpu_us_per_call"]) / CHECKPOINTS_PER_RUN
    rows, size, log_size = 0, 0, 0
    for db in workdir.rglob("durable.db"):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            rows += sum(conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("durable_runs", "run_steps"))
            for name, pages in conn.execute("SELECT name, sum(pgsize) FROM dbstat GROUP BY name"):
                if name.startswith(("durable_runs", "run_steps", "sqlite_autoindex_durable_runs")):
                    size += pages
                elif name.startswith(("runs", "events", "sqlite_autoindex_runs")):
                    log_size += pages
    per = (lambda n: n / rows) if rows else (lambda n: 0.0)
    return {
        "cpu_us": extra_us,
        "bytes": per(size),
        "log_bytes": per(log_size),
        "rows": rows,
        "per_run": CHECKPOINTS_PER_RUN,
    }


def _left_out(r: dict[str, Any]) -> bool:
    return bool(r.get("saturated") or r.get("failed"))


def _ratios(cand: dict[str, Any], base: dict[str, Any], key: str) -> tuple[list[float], int]:
    """The per-round ratios of the rounds in which h2load was not saturated and no stream failed, on either side;
    and how many rounds were left out."""
    pairs = list(zip(base["rounds"], cand["rounds"], strict=True))
    kept = [(b, n) for b, n in pairs if not (_left_out(b) or _left_out(n))]
    return [n[key] / b[key] for b, n in kept if b.get(key)], len(pairs) - len(kept)


def figure(label: str, key: str, unit: str, cand: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    ratios, left_out = _ratios(cand, base, key)
    return {
        "figure": label,
        "key": key,
        "unit": unit,
        "baseline": base[key],
        "candidate": cand[key],
        "ratios": ratios,
        "ratio": statistics.median(ratios) if ratios else None,
        "left_out": left_out,
        "rounds": len(base["rounds"]),
    }


def goal(
    label: str, key: str, bound: float, higher: bool, cand: dict[str, Any], base: dict[str, Any]
) -> dict[str, Any]:
    """A goal's verdict on the median of the per-round ratios, saying how many rounds meet it when not all do, and
    how many rounds were left out (h2load saturated, or streams failed)."""
    ratios, left_out = _ratios(cand, base, key)
    name = f"{label} {'≥' if higher else '≤' if bound != 1 else '<'} {bound:g}×"
    rounds = len(base["rounds"])
    if not ratios:
        verdict = f"not run: every round left out (h2load saturated or streams failed, {rounds}/{rounds})"
        return {"goal": name, "value": "-", "ratio": None, "ratios": [], "verdict": verdict, "left_out": left_out}
    med = statistics.median(ratios)
    met = [(r >= bound) if higher else (r <= bound if bound != 1 else r < 1) for r in ratios]
    ok = (med >= bound) if higher else (med <= bound if bound != 1 else med < 1)
    verdict = "pass" if ok else "**miss**"
    if not all(m == ok for m in met):
        verdict += f" ({sum(met)}/{len(met)} rounds meet it)"
    if left_out:
        verdict += f", {left_out}/{rounds} rounds left out"
    value = f"{med:.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
    return {"goal": name, "ratio": med, "ratios": ratios, "value": value, "verdict": verdict, "left_out": left_out}


def stage(
    plan: Plan, workdir: Path, redis_url: str = REDIS_URL, prefix: str | None = None, only: Any = STAGES
) -> dict[str, Any]:
    """Both comparisons, or a note saying why they did not run (no h2load, no Redis)."""
    path = h2load.find()
    why = f"h2load not found: {h2load.HINT}" if path is None else redis_answers(redis_url)
    if path is None or why is not None:
        say(f"replica benchmarks skipped: {why}")
        return {"skipped": why}
    prefix = prefix or f"bench:{secrets.token_hex(4)}:"
    results: dict[str, Any] = {
        "version": h2load.version(path),
        "saturated_pct": SATURATED_PCT,
        "waves": WAVES,
        "events_per_stream": len(timeline(plan.workload)),
        "redis_version": redis_version(redis_url),
        "comparisons": {},
    }
    try:
        for name in only:
            results["comparisons"][name] = compare(plan, workdir / name, path, COMPARISONS[name], redis_url, prefix)
    finally:
        with contextlib.suppress(Exception):  # the keys expire by TTL anyway
            results["keys_deleted"] = delete_keys(redis_url, prefix)
    return results


def write(results: dict[str, Any], machine: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results, machine))
    out.with_suffix(".json").write_text(json.dumps(results | {"machine": machine}, indent=1) + "\n")


def run(
    plan: Plan, out: Path, redis_url: str = REDIS_URL, prefix: str | None = None, only: Any = STAGES
) -> dict[str, Any]:
    """The stages into `out` (Markdown) and the rounds beside it (JSON); what `python -m bench` calls too."""
    import subprocess

    from bench.run import machine

    date = dt.datetime.now(dt.UTC)
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=30)
    started = time.monotonic()
    loadavg = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="agent-replicas-") as tmp:
        results = stage(plan, Path(tmp), redis_url, prefix, only)
    loadavg.append(os.getloadavg()[0])
    results |= {
        "mode": plan.mode,
        "date": f"{date:%Y-%m-%d %H:%M} UTC",
        "commit": commit.stdout.strip() or "?",
        "loadavg": loadavg,
        "elapsed_s": time.monotonic() - started,
    }
    write(results, machine(), out)
    say(f"replica benchmarks done in {results['elapsed_s']:.0f} s: {out}")
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.replicas", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="C = 5, two rounds (a test; seconds)")
    parser.add_argument("--out", type=Path, help="the Markdown file (default bench/results/<date>-replicas.md)")
    parser.add_argument("--redis-url", default=REDIS_URL, help=f"the Redis to share state through ({REDIS_URL})")
    parser.add_argument("--prefix", help="the Redis key prefix of this run (default bench:<random>:)")
    parser.add_argument("--stages", default=",".join(STAGES), help="state,workers,durable")
    args = parser.parse_args(argv)
    only = [s for s in args.stages.split(",") if s]
    if unknown := set(only) - set(STAGES):
        parser.error(f"unknown stages {sorted(unknown)}: {', '.join(STAGES)}")
    plan = PLANS["smoke" if args.smoke else "default"]
    out = args.out or ROOT / "bench" / "results" / f"{dt.datetime.now(dt.UTC):%Y-%m-%d}-replicas.md"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # C = 1000 connections; the children inherit it
    results = run(plan, out, args.redis_url, args.prefix, only)
    if "skipped" in results:
        raise SystemExit(f"not run: {results['skipped']}")


if __name__ == "__main__":
    main()
