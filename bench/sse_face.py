"""The HTTP face against the gRPC face on the same run, and against the FastAPI SSE baseline (issue 19): time to
first event at C = 100 and 1000 streams, one stream per connection, h2load driving the gRPC face over h2c and both SSE
systems over HTTP/1.1 (`--h1`). The three take turns round by round (`bench.plan.take_turns`), each validated first
by a real client; a ratio is the median of the per-round ratios, with the lowest and highest round.

    python -m bench.sse_face [--levels 100 1000] [--rounds N] [--out bench/results/NAME]

h2load gives no percentile of the time to first byte: the p99 goals read its max (the slowest of C connections, at
or above the p99), with the mean beside it, as in docs/performance.md. Writes NAME.json (every round) and NAME.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import tempfile
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import h2load, stats
from bench.h2bench import Rounds
from bench.h2load import Load
from bench.plan import PLANS, Plan, say, take_turns
from bench.procs import LABELS, ROOT, start
from bench.run import machine

GRPC, FACE, FASTAPI = "service", "service-sse", "sse-async"
SYSTEMS = (GRPC, FACE, FASTAPI)
# (goal, numerator, denominator, level, limit): the targets on first-event p99 (h2load's max)
GOALS = (
    ("SSE face ÷ gRPC face, C=100", FACE, GRPC, 100, 1.25),
    ("SSE face ÷ FastAPI SSE, C=1000", FACE, FASTAPI, 1000, 1.0),
)


def first_event_loads(c: int, proto: str) -> list[Load]:
    return [Load.spread(c, 1)]  # one stream per connection: h2load's time to first byte is then per stream


def measure(plan: Plan, levels: list[int], workdir: Path, path: str) -> dict[str, Any]:
    body = h2load.request_file(workdir)
    out: dict[str, Any] = {}
    for c in levels:
        rounds = Rounds(path, body, plan.workload, first_event_loads, plan.deadline_s)
        taken = take_turns({s: partial(start, s, plan.workload, workdir) for s in SYSTEMS}, c, plan, rounds)
        out[str(c)] = {s: stats.combine(taken[s]) for s in SYSTEMS}
        for s, r in out[str(c)].items():
            say(
                f"{s:12} C={c:<5} first event max {r['ttfb_max_ms']:7.1f} mean {r['ttfb_mean_ms']:7.1f} ms, "
                f"server {r['server_cpu_us_per_call']:6.0f} µs/call, h2load {r['load_cpu_pct']:3.0f} %, "
                f"errors {r['errors']} (median of {len(taken[s])})"
            )
    return out


def table(results: dict[str, Any]) -> str:
    m, rows = results["machine"], results["levels"]
    lines = [
        f"SSE face against gRPC face and FastAPI SSE ({results['date']}; {m['cpu_model']}, {m['cpus']} CPUs; "
        f"load average {results['loadavg_before']:.2f} before, {results['loadavg_after']:.2f} after; "
        f"{results['h2load']}).",
        "",
        "| C | system | first event max (p99 bound) | mean | server CPU / call | h2load CPU | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for c, by_system in rows.items():
        for s, r in by_system.items():
            lines.append(
                f"| {c} | {LABELS[s]} | {r['ttfb_max_ms']:.1f} ms | {r['ttfb_mean_ms']:.1f} ms | "
                f"{r['server_cpu_us_per_call']:.0f} µs | {r['load_cpu_pct']:.0f} % | {r['errors']} |"
            )
    lines += ["", "| goal (first-event p99) | ratio (rounds' range) | per round | result |", "|---|---|---|---|"]
    for goal, a, b, c, limit in GOALS:
        if str(c) not in rows:
            continue
        ra, rb = rows[str(c)][a], rows[str(c)][b]
        value = stats.paired_ratio(ra, rb, "ttfb_max_ms")
        pairs = zip(ra["rounds"], rb["rounds"], strict=True)
        per_round = ", ".join(f"{x['ttfb_max_ms'] / y['ttfb_max_ms']:.2f}" for x, y in pairs)
        verdict = "-" if value is None else ("pass" if value <= limit else "miss")
        cell = stats.ratio_cell(ra, rb, "ttfb_max_ms")
        lines.append(f"| {goal} ≤ {limit:g}× | {cell} | {per_round} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--rounds", type=int, help="rounds at every level (default: the plan's, 9 at C=100, 5 above)")
    parser.add_argument("--smoke", action="store_true", help="the smoke plan: a quick check that it all runs")
    parser.add_argument("--out", type=Path, help="write OUT.json and OUT.md (default: print the table)")
    args = parser.parse_args(argv)
    path = h2load.find()
    if path is None:
        raise SystemExit(f"h2load not found: {h2load.HINT}")
    plan = PLANS["smoke" if args.smoke else "default"]
    if args.rounds:
        plan = replace(plan, rounds=args.rounds, rounds_small=args.rounds, rounds_mid=args.rounds)
    before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="sse-face-") as tmp:
        levels = measure(plan, args.levels, Path(tmp), path)
    results = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "h2load": h2load.version(path).splitlines()[0],
        "loadavg_before": before,
        "loadavg_after": os.getloadavg()[0],
        "workload": plan.workload.as_dict(),
        "levels": levels,
    }
    text = table(results)
    print(text)
    if args.out is not None:
        out = args.out if args.out.is_absolute() else ROOT / args.out
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
