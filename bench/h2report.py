"""The h2load stages' targets and tables (`bench.h2bench`): times to first byte and request times, the server's CPU
per call start and per event, h2load's own CPU and the rounds it was saturated in."""

from __future__ import annotations

from typing import Any

from bench.procs import LABELS
from bench.stats import paired_ratio, ratio_cell
from bench.workers_sse import CLEARLY, SERVICE, SSE

# a2a: only where its venv was built (`make a2a-venv`); bare-stock: only in runs since `limits.accept_ahead`
PACED = ("service", "bare", "bare-stock", "sse-async", "a2a")
A2A_FACTOR = 4.0  # the service's time to first byte at C = 1000 at most a quarter of the A2A SDK server's


def _row(h2: dict[str, Any], system: str, c: int) -> dict[str, Any] | None:
    return next((r for r in h2["paced"]["rows"].get(system, []) if r["streams"] == c), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's h2load targets, each measured value and pass/miss (None: not measured, e.g. no h2load)."""
    h2 = results.get("h2load") or {}
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, limit: float) -> None:
        ok = None if value is None else value <= limit
        rows.append({"target": name, "value": None if value is None else f"{value:.2f}×", "pass": ok})

    levels = h2["paced"]["levels"] if "paced" in h2 else [100, 1000]
    big = [c for c in levels if c >= 100] or levels[-1:]
    for c in big:
        s, b = (_row(h2, x, c) if "paced" in h2 else None for x in ("service", "bare"))
        for stat in ("mean", "max"):
            add(f"h2load time to first byte, {stat} ≤ 1.25× bare (C={c})", paired_ratio(s, b, f"ttfb_{stat}_ms"), 1.25)
    cpu = h2.get("cpu", {})
    add("h2load server CPU per call start ≤ 1.25× bare", cpu.get("start", {}).get("ratio"), 1.25)
    add("h2load server CPU per event ≤ 1.2× bare (coalescing off)", cpu.get("event", {}).get("ratio"), 1.2)
    c = max(levels)
    s, a = (_row(h2, x, c) if "paced" in h2 else None for x in ("service", "sse-async"))
    for stat in ("mean", "max"):
        add(f"h2load time to first byte, {stat} ≤ FastAPI SSE's (C={c})", paired_ratio(s, a, f"ttfb_{stat}_ms"), 1.0)
    workers = h2.get("workers_sse", {})
    wc = max(workers.get("levels", [1000]))
    goals = workers.get("goals", {}).get(str(wc), {})
    for stat in ("mean", "max"):
        ratio = goals.get(stat, {}).get("ratio")  # rounds with failed streams left out too (bench.workers_sse)
        add(f"h2load time to first byte, {stat} ≤ {CLEARLY:g}× FastAPI SSE's, --workers 2 (C={wc})", ratio, CLEARLY)
    s, a = (_row(h2, x, c) if "paced" in h2 else None for x in ("service", "a2a"))
    for stat in ("mean", "max"):
        ratio = paired_ratio(s, a, f"ttfb_{stat}_ms")
        add(f"h2load time to first byte, {stat} ≤ 1/4 of the A2A SDK server's (C={c})", ratio, 1 / A2A_FACTOR)
    return rows


def markdown(results: dict[str, Any]) -> list[str]:
    h2 = results.get("h2load")
    if not h2:
        return []
    lines = ["", "## h2load: time to first byte, request times, server CPU", ""]
    if "skipped" in h2:
        return [*lines, f"**Not run.** {h2['skipped']}"]
    pct = h2["saturated_pct"]
    lines += [
        f"{h2['version']}, one thread. **Time to first byte**: C streams on C connections, from the start of",
        "connecting to the first byte of the first event (h2load's figure is per connection; *connect max* is the",
        "slowest connection set-up in it). **Request times**:",
        f"C streams, up to {h2['streams_per_connection']} to a connection (SSE: one per connection,"
        " HTTP/1.1 does not multiplex), from",
        "the request to the end of the stream; p50 and p99 from h2load's per-request log. **Server CPU** per call and",
        "per workload event: the server process's CPU time over the round's h2load runs over their calls (events).",
        f"**h2load CPU**: its CPU time as a share of one core over the run; a round above {pct:g} % is flagged",
        "saturated and left out of the ratios. Medians over the rounds; the systems took turns. Each server's first",
        "stream went through a real client before h2load's (h2load reads no trailers): "
        + "; ".join(f"{LABELS[s]} {v['status']}, {v['events']} events, {v['body_bytes']} B" for s, v in _valid(h2)),
        "",
        *_HEADER,
    ]
    lines += [_line(LABELS[system], r) for system in PACED for r in h2["paced"]["rows"].get(system, [])]
    lines += [
        "",
        "Agent service ÷ other system, medians of the per-round ratios (lowest–highest round in brackets):",
        "",
        "| vs | C | ttfb mean | ttfb max | request p99 | server CPU / call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for other in (p for p in PACED[1:] if p in h2["paced"]["rows"]):
        for c in h2["paced"]["levels"]:
            s, o = _row(h2, "service", c), _row(h2, other, c)
            keys = ("ttfb_mean_ms", "ttfb_max_ms", "req_p99_ms", "server_cpu_us_per_call")
            lines.append(f"| {LABELS[other]} | {c} | {' | '.join(ratio_cell(s, o, k) for k in keys)} |")
    return lines + _cpu(h2["cpu"]) + _workers(h2.get("workers_sse"))


def _line(label: str, r: dict[str, Any]) -> str:
    """A row of the paced table (and of the --workers 2 one): one system at one level, medians over its rounds."""
    sat = f" **sat. {r['saturated_rounds']}/{len(r['rounds'])}**" if r["saturated_rounds"] else ""
    errs = r["errors"] if not r["error_kinds"] else f"{r['errors']} {r['error_kinds']}"
    return (
        f"| {label} | {r['streams']} | {r['ttfb_mean_ms']:.1f} | {r['ttfb_max_ms']:.1f} | "
        f"{r['ttfb_min_ms']:.1f} | {r['ttfb_sd_ms']:.1f} | {_get(r, 'connect_max_ms')} | "
        f"{r['req_p50_ms']:.1f} | {r['req_p99_ms']:.1f} | "
        f"{r['req_max_ms']:.1f} | {r['req_per_s']:.0f} | {r['body_bytes_per_stream']:.0f} | "
        f"{r['server_cpu_us_per_call']:.0f} | {r['server_cpu_us_per_event']:.1f} | "
        f"{r['load_cpu_pct']:.0f}{sat} | {errs} |"
    )


def _workers(ws: dict[str, Any] | None) -> list[str]:
    """The service with --workers 2 (redis://) against FastAPI SSE: both rows, then the goal per level."""
    if not ws:
        return []
    lines = ["", "### --workers 2 against FastAPI SSE (h2load)", ""]
    if "skipped" in ws:
        return [*lines, f"**Not run.** {ws['skipped']}"]
    lines += [
        "The service with `--workers 2` on `state.url: redis://` (workers need shared state) and FastAPI SSE (async",
        "generator, one uvicorn process) taking turns, each round as in the paced table. h2load reads no trailers, so",
        "the service's streams are also checked against the runs it completed OK (its /metrics); a round with streams",
        "not completed OK on either side, or with h2load saturated, leaves the ratios.",
        "",
        *_HEADER,
    ]
    for name, label in ((SERVICE, "agent service, --workers 2"), (SSE, LABELS[SSE])):
        lines += [_line(label, r) for r in ws["rows"][name]]
    lines += ["", "| --workers 2 ÷ FastAPI SSE | C | measured (lowest–highest round) | result |", "|---|---:|---:|---|"]
    for c, goals in ws["goals"].items():
        lines += [f"| {g['goal']} | {c} | {g['value']} | {g['verdict']} |" for g in goals.values()]
    return lines


_HEADER = (
    "| system | C | ttfb mean | ttfb max | ttfb min | ttfb sd | connect max | request p50 | request p99"
    " | request max | req/s | body B / stream | server CPU µs / call | µs / event | h2load CPU % | errors |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
)


def _get(row: dict[str, Any], key: str) -> str:
    return f"{row[key]:.1f}" if key in row else "-"  # absent from runs before the column


def _valid(h2: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(s, h2["paced"]["validation"][s]) for s in PACED if s in h2["paced"]["validation"]]


def _cpu(cpu: dict[str, Any]) -> list[str]:
    start, event = cpu["start"], cpu["event"]
    n = cpu["in_flight"]
    lines = [
        "",
        f"### Server CPU per call start and per event (h2load, {n} calls in flight)",
        "",
        f"Per call start: {start['calls']} calls that send their first event, one text delta and end; the server's",
        "CPU time over them, per call. Per event: calls of"
        f" {event['events_per_call']:,} unpaced events ({event['calls']} of them),",
        "the server's CPU per call less the short call's, over the events it adds. The service's per-event rounds",
        "run with coalescing off, so that it sends one message per event as the bare server does.",
        "",
        "| µs of server CPU | agent service | bare grpc.aio | ratio (lowest–highest round) | h2load CPU % |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, part, key, service in (
        ("per call start", start, "server_cpu_us_per_call", "service"),
        ("per event", event, "server_cpu_us_per_added_event", "service-raw"),
    ):
        s, b = part["rows"][service], part["rows"]["bare"]
        load = max(s["load_cpu_pct"], b["load_cpu_pct"])
        lines.append(f"| {label} | {s[key]:.1f} | {b[key]:.1f} | {ratio_cell(s, b, key)} | {load:.0f} |")
    return lines
