"""Old against new: the agent services of two checkouts taking turns through the h2load stages (`bench.h2bench`), and
their tool-call microbenches (`bench.overhead`) taking turns the same way, so that every round's ratio new ÷ old
compares two runs made side by side on a machine that others share.

    python -m bench.versus OLD_DIR NEW_DIR [--out FILE.md] [--smoke]

Each checkout runs its own `python -m service` and its own `bench.overhead` with its own `.venv` (run
`make install` there first); the load, the workload, the request bytes and the validating client are this
checkout's, the same for both. A figure is the median over the rounds; a ratio is the median of the per-round
ratios with the lowest and highest round, and a round in which h2load was saturated leaves the ratios
(`bench.stats`). Writes the table (`versus.md`, the method in bench/README.md) and every round's figures as JSON
beside it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import h2bench, h2load, stats
from bench.h2bench import START_EVENTS, Rounds
from bench.plan import PLANS, SATURATED_PCT, Plan, say, take_turns
from bench.procs import ROOT, Server, child_env, start
from bench.run import machine, measure_level
from bench.workload import Workload

# the structure issue's figures: time to first byte at these levels, at least five rounds at each
LEVELS = (100, 1000)
MIN_ROUNDS = 5
OVERHEAD_KEYS = ("overhead_p50_us", "overhead_p99_us", "cpu_us_per_call")
PER_EVENT = "server_cpu_us_per_added_event"
STAGES = {"paced", "cpu", "overhead"}
OPTIONAL_STAGES = {"pyload"}  # asked for by name: the Python load's rounds take a few minutes more


@dataclass(frozen=True)
class Checkout:
    """One version of the service: a checkout of the repository with its own `.venv`."""

    name: str
    root: Path

    @property
    def python(self) -> str:
        venv = self.root / ".venv" / "bin" / "python"
        return str(venv) if venv.exists() else sys.executable

    def describe(self) -> dict[str, str]:
        git = ["git", "-C", str(self.root), "log", "-1", "--format=%H%n%s"]
        done = subprocess.run(git, capture_output=True, text=True, timeout=30)
        commit, _, subject = done.stdout.strip().partition("\n")
        # whether the checkout's own venv ran it, not where: results are committed, paths are this machine's
        return {"commit": commit or "?", "subject": subject, "own_venv": self.python != sys.executable}

    def start(self, system: str, workload: Workload, workdir: Path) -> Server:
        return start(system, workload, workdir / self.name, root=self.root, python=self.python)


class EachServer:
    """The measure for `take_turns` when both servers run the same system: one `h2bench.Rounds` per server, so that
    each checkout's service is validated by a real client before its first round (a `Rounds` validates once per
    system name). Each row also carries the machine's one-minute load average at its end."""

    def __init__(self, make: Callable[[], Rounds]) -> None:
        self.make = make
        self.by_port: dict[int, Rounds] = {}

    def __call__(self, server: Server, c: int, deadline: float) -> dict[str, Any]:
        rounds = self.by_port.setdefault(server.port, self.make())
        return rounds(server, c, deadline) | {"loadavg_1m": os.getloadavg()[0]}


def paced(plan: Plan, workdir: Path, path: str, checkouts: list[Checkout]) -> dict[str, Any]:
    """Time to first byte and request times on the paced workload at each level, as `h2bench.paced` measures the
    service against the bare server, here old against new."""
    body = h2load.request_file(workdir)
    loads = partial(h2bench.paced_loads, plan)
    return _each_level(
        plan,
        plan.h2load_levels or plan.levels,
        checkouts,
        workdir,
        lambda: EachServer(partial(Rounds, path, body, plan.workload, loads, plan.deadline_s)),
        lambda r: (
            f"ttfb mean {r['ttfb_mean_ms']:7.1f} max {r['ttfb_max_ms']:7.1f} ms, request p99 "
            f"{r['req_p99_ms']:7.1f} ms, h2load {r['load_cpu_pct']:3.0f} %"
        ),
    )


def pyload(plan: Plan, workdir: Path, checkouts: list[Checkout]) -> dict[str, Any]:
    """What h2load cannot see, old against new: the first event's and first token's p99 and the server's CPU per
    event under the Python load (`bench.run.measure_level`, as the bench's paced stage measures them), the
    two services taking turns at each level; a round in which a load process was saturated leaves the ratios."""
    return _each_level(
        plan,
        plan.levels,
        checkouts,
        workdir,
        lambda: _python_load,
        lambda r: (
            f"Python load: first event p99 {r['first_event_p99_ms']:7.1f} ms, first token p99 "
            f"{r['first_token_p99_ms']:7.1f} ms, load {r['load_cpu_pct']:3.0f} %"
        ),
    )


def _each_level(
    plan: Plan,
    levels: tuple[int, ...],
    checkouts: list[Checkout],
    workdir: Path,
    measure: Callable[[], Callable[[Server, int, float], dict[str, Any]]],
    line: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """The two services on the paced workload, taking turns at each level (`measure()` makes a level's measure);
    each level's rows (medians and rounds) by checkout, and a line said for each."""
    out: dict[str, Any] = {}
    for c in levels:
        starters = {k.name: partial(k.start, "service", plan.workload, workdir) for k in checkouts}
        rows = {name: stats.combine(r) for name, r in take_turns(starters, c, plan, measure()).items()}
        out[str(c)] = rows
        for name, r in rows.items():
            say(f"{name} C={c:<5} {line(r)} (median of {len(r['rounds'])})")
    return out


def _python_load(server: Server, c: int, deadline: float) -> dict[str, Any]:
    # The server's CPU per event from its threads' schedstat (nanoseconds), read around the level: `measure_level`'s
    # process CPU moves in 10 ms clock ticks, which read 0 for a small level (a smoke round of one stream did).
    cpu0 = server.thread_cpu_s()
    row = measure_level(server, c, deadline)
    cpu_s = server.thread_cpu_s() - cpu0
    per_event_us = cpu_s / row["events"] * 1e6 if row["events"] else 0.0
    return row | {"loadavg_1m": os.getloadavg()[0], "server_cpu_us_per_event": per_event_us}


def server_cpu(plan: Plan, workdir: Path, path: str, checkouts: list[Checkout]) -> dict[str, Any]:
    """The server's CPU per call start and per event, as `h2bench.server_cpu` measures it (short calls with
    coalescing on; long unpaced calls with coalescing off, less the short call's CPU), old against new."""
    body = h2load.request_file(workdir)
    n = plan.cpu_in_flight
    out: dict[str, Any] = {"in_flight": n}
    for part, calls, events, system in (
        ("start", plan.cpu_start_calls, START_EVENTS, "service"),
        ("event", plan.cpu_event_calls, plan.unpaced_events, "service-raw"),
    ):
        workload = plan.workload.unpaced(events)
        loads = partial(h2bench.cpu_loads, calls, n)
        measure = EachServer(partial(Rounds, path, body, workload, loads, plan.deadline_s))
        starters = {k.name: partial(k.start, system, workload, workdir) for k in checkouts}
        rounds = take_turns(starters, n, plan, measure)
        rows = {v: stats.combine(r) for v, r in rounds.items()}
        out[part] = {"calls": calls, "events_per_call": events, "rows": rows}
    added = plan.unpaced_events - START_EVENTS
    for k in checkouts:
        start_us = out["start"]["rows"][k.name]["server_cpu_us_per_call"]
        row = out["event"]["rows"][k.name]
        for r in row["rounds"]:
            r[PER_EVENT] = (r["server_cpu_us_per_call"] - start_us) / added
        row[PER_EVENT] = statistics.median(r[PER_EVENT] for r in row["rounds"])
        say(f"{k.name} server CPU: {start_us:.0f} µs per call start, {row[PER_EVENT]:.1f} µs per event")
    return out


def overhead(plan: Plan, checkouts: list[Checkout], rounds: int) -> dict[str, Any]:
    """Each checkout's own `bench.overhead` (the executor's µs per tool call over awaiting the tool directly), one
    process per round and checkout, taking turns in a rotating order."""
    runs: dict[str, list[dict[str, Any]]] = {k.name: [] for k in checkouts}
    for i in range(rounds):
        for k in checkouts[i % len(checkouts) :] + checkouts[: i % len(checkouts)]:
            cmd = [k.python, "-m", "bench.overhead", "--calls", str(plan.overhead_calls)]
            done = subprocess.run(cmd, cwd=k.root, env=child_env(k.root), capture_output=True, timeout=900, check=True)
            stack = json.loads(done.stdout)["stacks"]["executor"]
            runs[k.name].append({key: stack[key] for key in OVERHEAD_KEYS} | {"loadavg_1m": os.getloadavg()[0]})
    out = {}
    for name, rows in runs.items():
        out[name] = {key: statistics.median(r[key] for r in rows) for key in OVERHEAD_KEYS} | {"rounds": rows}
        say(f"{name} tool-call overhead p50 {out[name]['overhead_p50_us']:.1f} µs (median of {len(rows)})")
    return out


# (section, label, key): every figure compared, new ÷ old; lower is better for all of them
PYLOAD_FIGURES = (
    ("first event p99 (Python load)", "first_event_p99_ms", "ms"),
    ("first token p99 (Python load)", "first_token_p99_ms", "ms"),
    ("server CPU per event (Python load)", "server_cpu_us_per_event", "µs"),
)
PACED_FIGURES = (
    ("time to first byte, mean", "ttfb_mean_ms", "ms"),
    ("time to first byte, max", "ttfb_max_ms", "ms"),
    ("request p99", "req_p99_ms", "ms"),
    ("server CPU per call (paced)", "server_cpu_us_per_call", "µs"),
)


def comparisons(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per figure: old's and new's medians, the per-round ratios new ÷ old of the unsaturated rounds, their
    median and range, h2load's busiest round and how many rounds were saturated, and what the rounds say."""
    todo: list[tuple[str, str, dict[str, Any], dict[str, Any], str]] = []
    for c, rows in results.get("paced", {}).items():
        for label, key, unit in PACED_FIGURES:
            todo.append((f"{label}, C={c}", key, rows["old"], rows["new"], unit))
    for c, rows in results.get("pyload", {}).items():
        for label, key, unit in PYLOAD_FIGURES:
            todo.append((f"{label}, C={c}", key, rows["old"], rows["new"], unit))
    if cpu := results.get("cpu"):
        todo.append(("server CPU per call start (100 in flight)", "server_cpu_us_per_call", *_pair(cpu["start"]), "µs"))
        todo.append(("server CPU per event (100 in flight)", PER_EVENT, *_pair(cpu["event"]), "µs"))
    for key, label in (("overhead_p50_us", "tool-call overhead p50"), ("cpu_us_per_call", "tool-call CPU per call")):
        if ov := results.get("overhead"):
            todo.append((label, key, ov["old"], ov["new"], "µs"))
    return [compare(label, key, old, new, unit) for label, key, old, new, unit in todo]


def _pair(part: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    return part["rows"]["old"], part["rows"]["new"]


def compare(label: str, key: str, old: dict[str, Any], new: dict[str, Any], unit: str) -> dict[str, Any]:
    """A figure's paired verdict: "slower" or "faster" only when every unsaturated round says so (the spread of
    the per-round ratios leaves out 1), otherwise "within the spread"."""
    rounds = zip(old["rounds"], new["rounds"], strict=True)
    pairs = [(o, n) for o, n in rounds if not (o.get("saturated") or n.get("saturated"))]
    ratios = [n[key] / o[key] for o, n in pairs if o[key]]
    loads = [r["load_cpu_pct"] for r in old["rounds"] + new["rounds"] if "load_cpu_pct" in r]
    if not ratios:
        verdict = "not run: every round saturated"
    elif min(ratios) > 1:
        verdict = "**new slower**"
    elif max(ratios) < 1:
        verdict = "new faster"
    else:
        verdict = "within the spread"
    return {
        "figure": label,
        "key": key,
        "unit": unit,
        "old": old[key],
        "new": new[key],
        "ratios": ratios,
        "ratio": statistics.median(ratios) if ratios else None,
        "rounds": len(old["rounds"]),
        "saturated": len(old["rounds"]) - len(pairs),
        "load_cpu_pct_max": max(loads) if loads else None,
        "verdict": verdict,
    }


def markdown(results: dict[str, Any]) -> str:
    m, old, new = results["machine"], results["checkouts"]["old"], results["checkouts"]["new"]
    load = [r["loadavg_1m"] for r in _all_rounds(results)]
    lines = [
        f"# Old against new, paired: {old['commit'][:7]} → {new['commit'][:7]}",
        "",
        f"{results['date']}, `python -m bench.versus OLD NEW`, the {results['mode']} plan, "
        f"{results['elapsed_s'] / 60:.0f} min.",
        f"Old: `{old['commit'][:7]}` {old['subject']}. New: `{new['commit'][:7]}` {new['subject']}.",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']:.1f} GiB, Python {m['python']}, grpcio "
        f"{m['grpcio']}, {m['platform']}; {results['h2load_version']}. Load average (1 min): "
        f"{results['loadavg'][0]:.1f} at the start, {results['loadavg'][1]:.1f} at the end, "
        f"{min(load):.1f}–{max(load):.1f} at the ends of the rounds.",
        "",
        "new ÷ old, the median of the per-round ratios (lowest–highest round); below 1 new is faster. A verdict is",
        "given only when every unsaturated round agrees; load CPU is the busiest round's share of one core used by",
        f"h2load or by the busiest Python load process (a round above {results['saturated_pct']:.0f} % is saturated",
        "and left out).",
        "",
        "| figure | old | new | new ÷ old | per round | load CPU | sat. | reads |",
        "|---|---:|---:|---:|---|---:|---:|---|",
    ]
    for row in results["comparisons"]:
        ratios = row["ratios"]
        ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
        per_round = " ".join(f"{x:.2f}" for x in ratios)
        cpu = "-" if row["load_cpu_pct_max"] is None else f"{row['load_cpu_pct_max']:.0f} %"
        lines.append(
            f"| {row['figure']} | {row['old']:.1f} {row['unit']} | {row['new']:.1f} {row['unit']} | {ratio} | "
            f"{per_round} | {cpu} | {row['saturated']}/{row['rounds']} | {row['verdict']} |"
        )
    errors = sum(r.get("errors", 0) for r in _all_rounds(results))
    checked = (
        " Every server's first h2load stream went through a real client."
        if "paced" in results or "cpu" in results
        else ""
    )
    lines += ["", f"Errors over all rounds: {errors}.{checked}"]
    return "\n".join(lines) + "\n"


def _all_rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows = [row for stage in ("paced", "pyload") for level in results.get(stage, {}).values() for row in level.values()]
    if cpu := results.get("cpu"):
        rows += [row for part in ("start", "event") for row in cpu[part]["rows"].values()]
    rows += results.get("overhead", {}).values()
    return [r for row in rows for r in row["rounds"]]


def plan_for(smoke: bool, levels: tuple[int, ...] = LEVELS) -> Plan:
    """The default plan at C = 100 and 1000 with at least `MIN_ROUNDS` rounds at each; smoke: tiny and quick."""
    if smoke:
        return PLANS["smoke"]
    plan = PLANS["default"]
    return replace(
        plan,
        levels=levels,
        h2load_levels=levels,
        rounds_small=max(plan.rounds_small, MIN_ROUNDS),
        rounds_mid=max(plan.rounds_mid, MIN_ROUNDS),
    )


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.versus", description=__doc__)
    parser.add_argument("old", type=Path, help="the old checkout (with its own .venv)")
    parser.add_argument("new", type=Path, help="the new checkout (with its own .venv)")
    parser.add_argument("--out", type=Path, help="the Markdown file (default bench/results/<date>-old-vs-new.md)")
    parser.add_argument("--smoke", action="store_true", help="tiny levels and two rounds (a test; seconds)")
    parser.add_argument("--levels", type=_ints, default=LEVELS, help="time to first byte at these C (100,1000)")
    parser.add_argument(
        "--stages", type=lambda s: set(s.split(",")), default=STAGES, help="paced,cpu,overhead (default), pyload"
    )
    args = parser.parse_args(argv)
    if unknown := args.stages - STAGES - OPTIONAL_STAGES:
        parser.error(f"unknown stages {sorted(unknown)}: {', '.join(sorted(STAGES | OPTIONAL_STAGES))}")
    plan = plan_for(args.smoke, args.levels)
    path = h2load.find()
    if path is None:
        parser.error(f"h2load not found: {h2load.HINT}")
    checkouts = [Checkout("old", args.old.resolve()), Checkout("new", args.new.resolve())]
    date = dt.datetime.now(dt.UTC)
    out = args.out or ROOT / "bench" / "results" / f"{date:%Y-%m-%d}-old-vs-new.md"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # C = 1000 connections; the children inherit it
    started = time.monotonic()
    results: dict[str, Any] = {
        "mode": plan.mode,
        "date": f"{date:%Y-%m-%d %H:%M} UTC",
        "machine": machine(),
        "h2load_version": h2load.version(path),
        "saturated_pct": SATURATED_PCT,
        "checkouts": {k.name: k.describe() for k in checkouts},
        "loadavg": [os.getloadavg()[0]],
    }
    with tempfile.TemporaryDirectory(prefix="agent-versus-") as tmp:
        workdir = Path(tmp)
        if "paced" in args.stages:
            results["paced"] = paced(plan, workdir / "paced", path, checkouts)
        if "cpu" in args.stages:
            results["cpu"] = server_cpu(plan, workdir / "cpu", path, checkouts)
        if "pyload" in args.stages:
            results["pyload"] = pyload(plan, workdir / "pyload", checkouts)
        if "overhead" in args.stages:
            results["overhead"] = overhead(plan, checkouts, plan.rounds_at(max(LEVELS)))
    results["loadavg"].append(os.getloadavg()[0])
    results["elapsed_s"] = time.monotonic() - started
    results["comparisons"] = comparisons(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown(results))
    out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    for row in results["comparisons"]:
        say(f"  {row['figure']}: new ÷ old {row['ratio'] or 0:.2f} ({row['verdict']})")
    say(f"done in {results['elapsed_s']:.0f} s: {out}")


if __name__ == "__main__":
    main()
