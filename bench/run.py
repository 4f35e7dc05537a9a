"""The benchmark orchestrator: starts each system in its own process, drives it from a separate load process at
each concurrency level (h2load first, `bench.h2bench`; then the Python load for what h2load cannot see), then
writes the table and plots. `python -m bench [--smoke | --full] [--out DIR] [--stages main,replicas]`; the method
is in bench/README.md. The `replicas` stages (`bench.replicas`: redis:// against memory://, two workers against one)
write `replicas.md` beside `results.md`.

Every load run is bounded: a per-level deadline cuts streams that have not finished (the naive SSE pattern
serialises all streams, so its deadline is short and its figures are then lower bounds).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import psutil

from bench import h2bench, report, stats
from bench.plan import PLANS, SATURATED_PCT, Plan, say, take_turns
from bench.procs import NAIVE, ROOT, SYSTEMS, UNPACED, RssSampler, Server, child_env, start

STAGES = ("main", "replicas")


# Streams per Python load process. One process reading 1,000 paced streams used 76 % of a core on the bare server
# (2026-12-03, AMD EPYC): over the 70 % that flags a round saturated, so every C = 1000 round measured the load
# itself. Two processes of 500 each stay well under it; the machine's second core holds them beside the server.
STREAMS_PER_LOAD = 500


def load_cmd(server: Server, streams: int, deadline: float, hold: bool = False, go: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "bench.load", "--proto", server.proto, "--target", server.target]
    cmd += ["--streams", str(streams), "--deadline", str(deadline)]
    return [*cmd, "--hold"] if hold else [*cmd, "--go"] if go else cmd


def run_load(server: Server, streams: int, deadline: float, per_process: int = STREAMS_PER_LOAD) -> dict[str, Any]:
    """The Python load: one process per `per_process` streams, connected first and then started at once. The
    report joins theirs: every stream's record, the longest measuring window, and as `load_cpu_pct` the busiest
    process's CPU time over its window (all its threads; the interpreter's start and imports left out, which would
    read as a busy load), since each process's own loop is what saturates (`load_cpu_total_s`: all of them)."""
    processes = -(-streams // per_process)
    shares = [streams // processes + (i < streams % processes) for i in range(processes)]
    procs = [_spawn(load_cmd(server, n, deadline, go=True)) for n in shares]
    try:
        for proc in procs:  # each says it is connected; a process that fails says why on stderr
            assert proc.stdout is not None
            if not proc.stdout.readline():
                raise RuntimeError(f"load process failed: {proc.communicate()[1].decode()[-2000:]}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, err = proc.communicate(timeout=deadline + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"load process failed: {err.decode()[-2000:]}")
            reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    busiest = max(reports, key=_pct)
    return {
        "wall_s": max(r["wall_s"] for r in reports),
        "load_cpu_s": busiest["load_cpu_s"],
        "load_cpu_pct": _pct(busiest),
        "load_cpu_total_s": sum(r["load_cpu_s"] for r in reports),
        "load_processes": len(reports),
        "connections": sum(r["connections"] for r in reports),
        "records": [rec for r in reports for rec in r["records"]],
    }


def _spawn(cmd: list[str]) -> subprocess.Popen[bytes]:
    """A load process talking over pipes: lines on stdin drive it, its reports come on stdout."""
    return subprocess.Popen(
        cmd, cwd=ROOT, env=child_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def _pct(report: dict[str, Any]) -> float:
    """A load process's CPU time as a share of one core over its measuring window."""
    return 100 * report["load_cpu_s"] / report["wall_s"] if report["wall_s"] else 0.0


def measure_level(server: Server, streams: int, deadline: float) -> dict[str, Any]:
    """One level: CPU time and peak RSS of the server around one load run of `streams` concurrent streams."""
    time.sleep(0.3)
    cpu0, rss0 = server.cpu_s(), server.rss()
    with RssSampler(server) as sampler:
        load = run_load(server, streams, deadline)
    cpu = server.cpu_s() - cpu0
    row = report.summarize(load, deadline)
    row["server_cpu_s"] = cpu
    row["cpu_s_per_1k_events"] = cpu / row["events"] * 1000 if row["events"] else 0.0
    row["rss_per_stream_bytes"] = max(0, sampler.peak - rss0) / streams
    row["connections"] = load["connections"]
    row["load_cpu_s"] = load["load_cpu_s"]
    row["load_cpu_pct"] = load["load_cpu_pct"]  # the busiest load process's
    row["load_processes"] = load["load_processes"]
    row["saturated"] = row["load_cpu_pct"] > SATURATED_PCT
    return row


def paced(plan: Plan, workdir: Path) -> dict[str, list[dict[str, Any]]]:
    """Each level on fresh server processes, one per system. The systems take turns, `plan.rounds_at(c)` times and
    in a rotating order, so that a noisy spell on the shared machine hits them all alike; each figure is the median
    over the rounds, and a ratio the median of the per-round ratios (`report.paired_ratio`). The naive SSE pattern
    runs once, last and alone: a cut run keeps its server busy long after the load process has gone."""
    out: dict[str, list[dict[str, Any]]] = {s: [] for s in SYSTEMS}
    taking_turns = [s for s in SYSTEMS if s != NAIVE]
    for c in plan.levels:
        starters = {system: partial(start, system, plan.workload, workdir) for system in taking_turns}
        rounds = take_turns(starters, c, plan, measure_level)
        server = start(NAIVE, plan.workload, workdir)
        try:  # the naive server serialises streams: warm it with one
            run_load(server, 1, plan.naive_deadline_s)
            rounds[NAIVE] = [measure_level(server, c, plan.naive_deadline_s)]
        finally:
            server.stop()
        for system in SYSTEMS:
            out[system].append(row := stats.combine(rounds[system]))
            say(
                f"paced {system:9} C={c:<5} first event p99 {row['first_event_p99_ms']:8.1f} ms, first token p99 "
                f"{row['first_token_p99_ms']:8.1f} ms, {row['events_per_s']:8.0f} ev/s, errors {row['errors']}"
                f" (median of {len(rounds[system])})"
            )
    return out


def unpaced(plan: Plan, workdir: Path) -> dict[int, dict[str, dict[str, Any]]]:
    """Throughput without pacing, the systems taking turns `plan.rounds` times as in `paced`."""
    workload = plan.workload.unpaced(plan.unpaced_events)
    rounds: dict[int, dict[str, list[dict[str, Any]]]] = {n: {s: [] for s in UNPACED} for n in plan.unpaced_streams}
    servers: dict[str, Server] = {}
    try:
        for system in UNPACED:
            servers[system] = start(system, workload, workdir)
            run_load(servers[system], plan.warmup_streams, plan.deadline_s)
        for i in range(plan.rounds):
            for n in plan.unpaced_streams:
                for system in UNPACED[i % len(UNPACED) :] + UNPACED[: i % len(UNPACED)]:
                    row = measure_level(servers[system], n, plan.deadline_s)
                    row["workload_events_per_s"] = plan.unpaced_events * row["completed"] / row["wall_s"]
                    rounds[n][system].append(row)
    finally:
        for server in servers.values():
            server.stop()
    out: dict[int, dict[str, dict[str, Any]]] = {n: {} for n in plan.unpaced_streams}
    for n, by_system in rounds.items():
        for system, rows in by_system.items():
            out[n][system] = row = stats.combine(rows)
            say(f"unpaced {system:11} streams={n:<4} {row['workload_events_per_s']:9.0f} ev/s, err {row['errors']}")
    return out


def idle(plan: Plan, workdir: Path) -> dict[str, dict[str, Any]]:
    """Server RSS with N open, quiet streams minus RSS with none, over N."""
    out: dict[str, dict[str, Any]] = {}
    for system in ("service", "bare", "sse-async"):
        server = start(system, plan.workload.idle(), workdir)
        try:
            hold_streams(server, min(plan.warmup_streams, plan.idle_streams), plan.deadline_s, plan.settle_s)
            time.sleep(plan.settle_s / 2)
            out[system] = row = hold_streams(server, plan.idle_streams, plan.deadline_s, plan.settle_s)
        finally:
            server.stop()
        say(f"idle {system:9} {row['ready']}/{row['streams']} open, {row['per_stream_bytes'] / 1024:.1f} KiB/stream")
    return out


@contextmanager
def held(server: Server, streams: int, deadline: float) -> Iterator[int]:
    """Open `streams` streams from a load process and hold them open: yields how many got their first event
    (the load process has connected and opened them all, or reached `deadline`); closes them on exit."""
    proc = _spawn(load_cmd(server, streams, deadline, hold=True))
    assert proc.stdin is not None and proc.stdout is not None
    try:
        yield json.loads(proc.stdout.readline() or b'{"ready": 0}')["ready"]
    finally:
        proc.communicate(b"\n", timeout=deadline + 60)  # reads the final report too: a full pipe would block it


def open_burst(server: Server, streams: int, deadline: float) -> dict[str, Any]:
    """The server's CPU (all its threads) per call for a burst of `streams` new streams, from before the load
    process starts until every stream has its first event. On the idle workload nothing else is sent, so this is
    what starting a call costs live, grpc's share included (and, over the burst, the load's one connection per
    hundred streams)."""
    time.sleep(0.3)  # the previous burst's streams are closed and reaped
    cpu0 = server.thread_cpu_s()
    with held(server, streams, deadline) as ready:
        cpu = server.thread_cpu_s() - cpu0
    return {"ready": ready, "cpu_us_per_call": cpu / streams * 1e6}


def hold_streams(server: Server, streams: int, deadline: float, settle_s: float) -> dict[str, Any]:
    rss0 = server.rss()
    with held(server, streams, deadline) as ready:
        time.sleep(settle_s)  # let the server settle (buffers, freed request objects) before reading its memory
        rss1 = server.rss()
    return {
        "streams": streams,
        "ready": ready,
        "rss_before": rss0,
        "rss_open": rss1,
        "per_stream_bytes": (rss1 - rss0) / streams,
    }


def overhead(plan: Plan) -> dict[str, Any]:
    """The in-process tool-call figures, measured in `plan.rounds` separate processes; each figure is the median
    over them (one process's p50 moves by ±10 µs with the machine's state)."""
    cmd = [sys.executable, "-m", "bench.overhead", "--calls", str(plan.overhead_calls)]
    runs = []
    for _ in range(plan.rounds):
        done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, timeout=300, check=True)
        runs.append(json.loads(done.stdout))
    result: dict[str, Any] = runs[0]
    for name, stack in result["stacks"].items():
        for key in stack:
            stack[key] = statistics.median(r["stacks"][name][key] for r in runs)
    result["rounds"] = len(runs)
    say(f"tool-call overhead p50 {result['stacks']['executor']['overhead_p50_us']:.1f} µs (median of {len(runs)})")
    return result


def start_budget(plan: Plan, workdir: Path) -> dict[str, Any]:
    """What a run's start may cost. The bare server runs at C = `plan.budget_streams` once as is and once per CPU
    cost in `plan.budget_cpu_us`, spent at each call's start; the variants take turns as in `paced`, and each
    row's ratio is its first-event p99 over the unchanged bare server's. Beside it, what starting a call costs the
    service and the bare server in CPU: live (`open_burst`: bursts of C idle streams, the two servers taking turns)
    and in-process (`bench.startcost`, without grpc). Together they say how far the service's start is from a
    given first-event ratio."""
    c = plan.budget_streams
    costs = tuple(dict.fromkeys((0, *plan.budget_cpu_us)))
    starters = {us: partial(start, "bare", plan.workload, workdir, start_cpu_us=us) for us in costs}
    rounds = take_turns(starters, c, plan, measure_level)
    rows = {us: stats.combine(rows) for us, rows in rounds.items()}
    out: dict[str, Any] = {"streams": c, "rows": []}
    for us in costs:
        row = rows[us]
        out["rows"].append(
            {
                "start_cpu_us": us,
                "first_event_p99_ms": row["first_event_p99_ms"],
                "ratio": stats.paired_ratio(row, rows[0], "first_event_p99_ms"),
                "spread": stats.ratio_spread(row, rows[0], "first_event_p99_ms"),
                "errors": row["errors"],
                "rounds": len(rounds[us]),
            }
        )
        say(f"start budget +{us:4} µs CPU/call: first event p99 {row['first_event_p99_ms']:.1f} ms")
    idle = plan.workload.idle()
    live = take_turns(
        {system: partial(start, system, idle, workdir) for system in ("service", "bare")}, c, plan, open_burst
    )
    out["live"] = {
        system: {
            "cpu_us_per_call": statistics.median(r["cpu_us_per_call"] for r in rows),
            "ready": min(r["ready"] for r in rows),
            "rounds": len(rows),
        }
        for system, rows in live.items()
    }
    out["live_ratio"] = statistics.median(
        s["cpu_us_per_call"] / b["cpu_us_per_call"] for s, b in zip(live["service"], live["bare"], strict=True)
    )
    say(
        f"start cost live: service {out['live']['service']['cpu_us_per_call']:.0f} µs, bare "
        f"{out['live']['bare']['cpu_us_per_call']:.0f} µs of server CPU per call ({out['live_ratio']:.2f}x)"
    )
    cmd = [sys.executable, "-m", "bench.startcost", "--runs", str(c), "--batches", str(plan.startcost_batches)]
    done = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, timeout=600, check=True)
    out["startcost"] = cost = json.loads(done.stdout)
    say(f"start cost in-process: service {cost['service_us']:.0f} µs, bare {cost['bare_us']:.0f} µs of CPU per run")
    return out


def machine() -> dict[str, Any]:
    import fastapi
    import grpc
    import uvicorn

    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    return {
        "cpus": psutil.cpu_count(),
        "cpu_model": model,
        "memory_gib": psutil.virtual_memory().total / 2**30,
        "python": platform.python_version(),
        "grpcio": grpc.__version__,
        "fastapi": fastapi.__version__,
        "uvicorn": uvicorn.__version__,
        "platform": platform.platform(terse=True),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--smoke", action="store_true", help="tiny levels and short pacing (CI; < 60 s)")
    group.add_argument("--full", action="store_true", help="add C = 5000")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results, or bench/results/smoke)")
    parser.add_argument("--levels", type=lambda s: tuple(int(x) for x in s.split(",")), help="e.g. 1,100")
    parser.add_argument(
        "--stages",
        type=lambda s: set(s.split(",")),
        default=set(STAGES),
        help="main (every stage of results.md), replicas (replicas.md: needs Redis, else skipped with a note)",
    )
    args = parser.parse_args(argv)
    if unknown := args.stages - set(STAGES):
        parser.error(f"unknown stages {sorted(unknown)}: {', '.join(STAGES)}")
    plan = PLANS["smoke" if args.smoke else "full" if args.full else "default"]
    if args.levels:
        plan = replace(plan, levels=args.levels)
    out = args.out or ROOT / "bench" / "results" / ("smoke" if args.smoke else "")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    if "main" in args.stages:
        main_stages(plan, out)
    if "replicas" in args.stages:
        from bench import replicas  # it pairs through bench.versus, which imports this module

        replicas.run(plan, out / "replicas.md")


def main_stages(plan: Plan, out: Path) -> None:
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": plan.mode,
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "workload": plan.workload.as_dict(),
        "levels": list(plan.levels),
        "unpaced_events": plan.unpaced_events,
        "rounds": plan.rounds,
        "rounds_small": plan.rounds_small,
        "rounds_mid": plan.rounds_mid,
        "saturated_pct": SATURATED_PCT,
    }
    with tempfile.TemporaryDirectory(prefix="agent-bench-") as tmp:
        workdir = Path(tmp)
        results["h2load"] = h2bench.stage(plan, workdir)
        results["overhead"] = overhead(plan)
        results["paced"] = paced(plan, workdir)
        results["unpaced"] = unpaced(plan, workdir)
        results["idle"] = idle(plan, workdir)
        results["start_budget"] = start_budget(plan, workdir)
    results["elapsed_s"] = time.monotonic() - started
    report.write(results, out)
    say(f"done in {results['elapsed_s']:.0f} s: {out / 'results.md'}")
    for t in results["targets"]:
        say(f"  {t['target']}: {t['value']} {report._mark(t['pass'])}")
