"""The stages h2load drives: the time to first byte and request times at each level, the service, the bare server and
FastAPI SSE taking turns (`paced`), and the server's CPU per call start and per event (`server_cpu`). Every round
carries h2load's CPU share and the saturation flag; each server's first stream is validated by a real client."""

from __future__ import annotations

import math
import statistics
import time
from functools import partial
from pathlib import Path
from typing import Any

from bench import h2load, stats
from bench.h2load import Load
from bench.plan import SATURATED_PCT, Plan, say, take_turns
from bench.procs import Server, start
from bench.workload import Workload, timeline

# bare-stock: the bare server as grpc.aio takes up new calls by itself, without `limits.accept_ahead`; "bare" has
# the service's accept-ahead, so that service ÷ bare measures the agent machinery and not that transport change
PACED = ("service", "bare", "bare-stock", "sse-async")
# coalescing merges text deltas at the source: only a system that sends one message per event has an exact count
EXACT = {"bare", "bare-stock", "service-raw", "sse-async", "a2a"}
START_EVENTS = 4  # a call that starts, sends one text delta and ends: run_started, text, usage, final_response


class Rounds:
    """The measure for `take_turns`: one round on one server. Before the server's first round, one stream through a
    real client (`h2load.validate`); then h2load runs `loads(c)`, and the row gets the server's CPU time over them,
    per call and per workload event."""

    def __init__(self, path: str, body: Path, workload: Workload, loads: Any, deadline: float) -> None:
        self.path, self.body, self.workload, self.loads, self.deadline = path, body, workload, loads, deadline
        self.validated: dict[str, dict[str, Any]] = {}

    def __call__(self, server: Server, c: int, deadline: float) -> dict[str, Any]:
        if server.system not in self.validated:
            exact = server.system in EXACT
            self.validated[server.system] = h2load.validate(server, self.body, self.workload, exact, self.deadline)
        time.sleep(0.3)  # the previous round's connections are closed
        # a server of one process to the nanosecond (schedstat): in 10 ms ticks a small round could read 0 CPU;
        # with --workers its children do the work, which only the ticks of their process times see
        read = server.cpu_s if server.ps.children() else server.thread_cpu_s
        cpu0 = read()
        runs = [h2load.run(self.path, server, self.body, load, deadline) for load in self.loads(c, server.proto)]
        return row(runs, read() - cpu0, len(timeline(self.workload)), c)


def row(runs: list[dict[str, Any]], server_cpu_s: float, events_per_call: int, c: int) -> dict[str, Any]:
    """One round's figures from its h2load runs: times to first byte from the first run (one stream per
    connection), request times and rate from the last, counts and CPU over all of them. Times in ms."""
    first, last = runs[0], runs[-1]
    calls = sum(r["requests"]["total"] for r in runs)
    ok = sum(r["requests"]["succeeded"] for r in runs)
    kinds: dict[str, int] = {}
    for r in runs:
        for kind in ("failed", "errored", "timeout"):
            if r["requests"].get(kind):
                kinds[kind] = kinds.get(kind, 0) + r["requests"][kind]
    load_pct = max(r["load_cpu_pct"] for r in runs)
    out = {f"ttfb_{k}_ms": v * 1000 for k, v in first["ttfb"].items()}
    out |= {f"connect_{k}_ms": v * 1000 for k, v in first.get("connect", {}).items() if k in ("mean", "max")}
    out |= {f"req_{k}_ms": v * 1000 for k, v in last["request"].items() if k in ("mean", "max")}
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        out[f"req_{label}_ms"] = stats.percentile(last["times"], q) * 1000
    return out | {
        "streams": c,
        "calls": calls,
        "succeeded": ok,
        "errors": calls - ok,
        "error_kinds": kinds,
        "censored": [],
        "req_per_s": last["req_per_s"],
        "body_bytes_per_stream": first["data_bytes"] / max(1, first["requests"]["succeeded"]),
        "load_cpu_pct": load_pct,
        "saturated": load_pct > SATURATED_PCT,
        "server_cpu_us_per_call": server_cpu_s / calls * 1e6,
        "server_cpu_us_per_event": server_cpu_s / (calls * events_per_call) * 1e6,
    }


def paced_loads(plan: Plan, c: int, proto: str) -> list[Load]:
    """The paced round's h2load runs at C = `c`: one stream per connection (time to first byte), then
    `plan.streams_per_connection` to a connection (request times) unless that is the same run."""
    ttfb = Load.spread(c, 1)
    spread = Load.spread(c, plan.streams_per_connection, proto)
    return [ttfb] if spread == ttfb else [ttfb, spread]


def cpu_loads(calls: int, in_flight: int, c: int, proto: str) -> list[Load]:
    """The server-CPU round's one h2load run: `calls` calls, `c` at a time, at most a hundred to a connection; a
    warm-up (`c` below `in_flight`) runs as many fewer calls."""
    per = min(c, 100)
    return [Load(max(c, calls * c // in_flight), math.ceil(c / per), per)]


def paced(plan: Plan, workdir: Path, path: str) -> dict[str, Any]:
    """At each level, C streams on C connections (time to first byte), then C streams `plan.streams_per_connection`
    to a connection (request times), on the paced workload; the systems take turns as in the Python-load stage."""
    body = h2load.request_file(workdir)
    levels = plan.h2load_levels or plan.levels
    systems = PACED
    if h2load.a2a_available():
        h2load.a2a_request_file(workdir)
        systems = (*PACED, "a2a")
    else:
        say(f"no A2A SDK venv at {h2load.A2A_PYTHON}, so its rows were skipped: `make a2a-venv` builds it")
    out: dict[str, Any] = {"levels": list(levels), "rows": {s: [] for s in systems}, "validation": {}}
    for c in levels:
        measure = Rounds(path, body, plan.workload, partial(paced_loads, plan), plan.deadline_s)
        rounds = take_turns({s: partial(start, s, plan.workload, workdir) for s in systems}, c, plan, measure)
        out["validation"] |= measure.validated
        for system in systems:
            out["rows"][system].append(r := stats.combine(rounds[system]))
            say(
                f"h2load {system:9} C={c:<5} ttfb mean {r['ttfb_mean_ms']:7.1f} max {r['ttfb_max_ms']:7.1f} ms, "
                f"request p99 {r['req_p99_ms']:7.1f} ms, server {r['server_cpu_us_per_call']:6.0f} µs/call, "
                f"h2load {r['load_cpu_pct']:3.0f} % CPU, errors {r['errors']} (median of {len(rounds[system])})"
            )
    return out


def server_cpu(plan: Plan, workdir: Path, path: str) -> dict[str, Any]:
    """The server's CPU per call start and per event, live: `plan.cpu_start_calls` short calls (start, one text
    delta, end) and `plan.cpu_event_calls` long ones (`plan.unpaced_events` unpaced events), `plan.cpu_in_flight`
    at a time on one connection per hundred, the service and the bare server taking turns. Per event: the long
    call's CPU less the short call's, over the events it adds. The service's per-event rounds run with coalescing
    off, so that it sends one message per event as the bare server does."""
    body = h2load.request_file(workdir)
    n = plan.cpu_in_flight
    out: dict[str, Any] = {"in_flight": n}
    for name, calls, events, systems in (
        ("start", plan.cpu_start_calls, START_EVENTS, ("service", "bare")),
        ("event", plan.cpu_event_calls, plan.unpaced_events, ("service-raw", "bare")),
    ):
        workload = plan.workload.unpaced(events)
        measure = Rounds(path, body, workload, partial(cpu_loads, calls, n), plan.deadline_s)
        starters = {s: partial(start, s, workload, workdir) for s in systems}
        rounds = take_turns(starters, n, plan, measure)
        out[name] = {"calls": calls, "events_per_call": events, "rows": {s: stats.combine(rounds[s]) for s in systems}}
    # the service's start is read with coalescing on; a call of one text delta has nothing to merge either way
    for system, short in (("service-raw", "service"), ("bare", "bare")):
        start_us = out["start"]["rows"][short]["server_cpu_us_per_call"]
        for r in out["event"]["rows"][system]["rounds"]:
            r["server_cpu_us_per_added_event"] = (r["server_cpu_us_per_call"] - start_us) / (
                plan.unpaced_events - START_EVENTS
            )
    for name, key, service in (
        ("start", "server_cpu_us_per_call", "service"),
        ("event", "server_cpu_us_per_added_event", "service-raw"),
    ):
        rows = out[name]["rows"]
        for r in rows.values():
            r[key] = statistics.median(x[key] for x in r["rounds"])
        out[name]["ratio"] = stats.paired_ratio(rows[service], rows["bare"], key)
        out[name]["spread"] = stats.ratio_spread(rows[service], rows["bare"], key)
        say(
            f"h2load server CPU per {name}: service {rows[service][key]:.1f} µs, bare {rows['bare'][key]:.1f} µs"
            f" ({out[name]['ratio'] or 0:.2f}x)"
        )
    return out


def stage(plan: Plan, workdir: Path) -> dict[str, Any]:
    """The h2load stages (`--workers 2` against FastAPI SSE last: `bench.workers_sse`), or a note saying why they did
    not run and how to make them run."""
    from bench import workers_sse  # noqa: PLC0415  (it builds on bench.replicas, which imports this module)

    path = h2load.find()
    if path is None:
        note = f"h2load not found, so its rows were skipped: {h2load.HINT}"
        say(note)
        return {"skipped": note}
    return {
        "version": h2load.version(path),
        "saturated_pct": SATURATED_PCT,
        "streams_per_connection": plan.streams_per_connection,
        "paced": paced(plan, workdir / "h2load", path),
        "cpu": server_cpu(plan, workdir / "h2load-cpu", path),
        "workers_sse": workers_sse.stage(plan, workdir / "h2load-workers-sse", path),
    }
