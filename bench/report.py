"""Turns raw load records into figures (percentiles, rates, ratios), checks the issue's targets, and writes
`results.md`, `results.json` and the PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from bench import h2report
from bench.procs import LABELS, SYSTEMS, UNPACED
from bench.stats import paired_ratio, percentile, ratio_cell, saturated

KIB = 1024


def summarize(load: dict[str, Any], deadline: float) -> dict[str, Any]:
    """Per-level figures from one load run. A time a stream never reached counts as the deadline, and the figure
    is then a lower bound (`censored`)."""
    records = load["records"]
    out: dict[str, Any] = {"streams": len(records), "wall_s": load["wall_s"], "censored": []}
    for key, name in (("first_event_s", "first_event"), ("first_token_s", "first_token"), ("total_s", "total")):
        values = [r[key] if r[key] is not None else math.inf for r in records]
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            value = percentile(values, q)
            if math.isinf(value):
                value = deadline
                out["censored"].append(f"{name}_{label}")
            out[f"{name}_{label}_ms"] = value * 1000
    out["events"] = sum(r["events"] for r in records)
    out["text_chars"] = sum(r.get("text_chars", 0) for r in records)
    out["completed"] = sum(1 for r in records if r["total_s"] is not None and not r["error"])
    out["events_per_s"] = out["events"] / load["wall_s"] if load["wall_s"] else 0.0
    errors: dict[str, int] = {}
    for r in records:
        if r["error"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    out["errors"] = sum(errors.values())
    out["error_kinds"] = errors
    return out


def _level(results: dict[str, Any], system: str, c: int) -> dict[str, Any] | None:
    return next((row for row in results["paced"].get(system, []) if row["streams"] == c), None)


def targets(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, each with the measured value and pass/miss (None: not measured in this run)."""
    rows: list[dict[str, Any]] = []

    def add(name: str, value: float | None, ok: bool | None, fmt: str, note: str | None = None) -> None:
        rows.append({"target": name, "value": note if value is None else fmt.format(value), "pass": ok})

    big = [c for c in results["levels"] if c >= 100] or results["levels"][-1:]
    for c in big:
        s, b = _level(results, "service", c), _level(results, "bare", c)
        flagged, total = saturated(s, b)
        note = f"load saturated in {flagged}/{total} rounds" if flagged == total and total else None
        fe = paired_ratio(s, b, "first_event_p99_ms")
        ft = paired_ratio(s, b, "first_token_p99_ms")
        add(
            f"first-event p99 ≤ 1.25× bare (C={c}, Python load)",
            fe,
            None if fe is None else fe <= 1.25,
            "{:.2f}×",
            note,
        )
        add(f"first-token p99 ≤ 1.1× bare (C={c}, Python load)", ft, None if ft is None else ft <= 1.1, "{:.2f}×", note)
    for n, row in results["unpaced"].items():
        merged = paired_ratio(row["service"], row["bare"], "workload_events_per_s")
        raw = row.get("service-raw")  # absent from results older than the coalescing-off row
        r = paired_ratio(raw, row["bare"], "workload_events_per_s") if raw else merged
        fmt = "{:.2f}×" + (f" (coalescing on: {merged:.2f}×)" if raw and merged is not None else "")
        flagged, total = saturated(raw or row["service"], row["bare"])
        note = f"load saturated in {flagged}/{total} rounds" if flagged else None
        name = f"unpaced events/s ≥ 0.7× bare, coalescing off (streams={n}, Python load)"
        add(name, r, None if r is None else r >= 0.7, fmt, note)
    c = 100 if 100 in results["levels"] else results["levels"][-1]
    s, a = _level(results, "service", c), _level(results, "sse-async", c)
    x = paired_ratio(a, s, "first_event_p99_ms")
    add(f"first-event p99 ≥ 5× lower than FastAPI async SSE (C={c})", x, None if x is None else x >= 5, "{:.1f}×")
    ov = results["overhead"]["stacks"]["executor"]["overhead_p50_us"]
    add("tool-call overhead < 50 µs p50 (full policy stack)", ov, ov < 50, "{:.1f} µs")
    mem = results["idle"].get("service")
    kib = mem and mem["per_stream_bytes"] / KIB
    add(
        f"≤ 40 KiB per idle open stream ({mem and mem['streams']} streams)",
        kib,
        kib is not None and kib <= 40,
        "{:.1f} KiB",
    )
    full = _level(results, "service", 5000)
    add(
        "5,000 paced streams, no error",
        full and full["errors"],
        None if full is None else full["errors"] == 0,
        "{} errors",
    )
    return rows


def _ms(row: dict[str, Any], key: str) -> str:
    mark = "≥" if key.removesuffix("_ms") in row["censored"] else ""
    return f"{mark}{row[key]:.1f}"


def _cpu(row: dict[str, Any]) -> str:
    """Busy share of one core over the level, server and load generator (the load's over its own measuring window,
    median over the rounds), and how many rounds the load generator was saturated in."""
    wall = row["wall_s"] or 1.0
    load = row.get("load_cpu_pct", 100 * row.get("load_cpu_s", 0.0) / wall)
    flagged = row.get("saturated_rounds", 0)
    mark = f" **sat. {flagged}/{len(row.get('rounds', [row]))}**" if flagged else ""
    return f"{100 * row['server_cpu_s'] / wall:.0f} / {load:.0f}{mark}"


def _mark(ok: bool | None) -> str:
    return {True: "pass", False: "**miss**", None: "not run"}[ok]


def markdown(results: dict[str, Any]) -> str:
    m = results["machine"]
    w = results["workload"]
    lines = [
        f"# Benchmark results ({results['mode']})",
        "",
        f"{results['date']} · {m['cpus']} CPUs ({m['cpu_model']}) · {m['memory_gib']:.0f} GiB · Python {m['python']}"
        f" · grpcio {m['grpcio']} · FastAPI {m['fastapi']} · uvicorn {m['uvicorn']} · {m['platform']}",
        "",
        f"Workload per stream: first event at once, first token after {w['first_token_s'] * 1000:g} ms, "
        f"{w['text_tokens']} tokens {w['token_interval_s'] * 1000:g} ms apart, one tool call of "
        f"{w['tool_latency_s'] * 1000:g} ms, then a {w['answer_tokens']}-token answer. Server and load generator "
        "are separate processes on 127.0.0.1; every system in its own process. Times in ms. Paced figures are"
        f" medians over {results.get('rounds_small', results.get('rounds', 1))} rounds at C ≤ 100,"
        f" {results.get('rounds_mid', results.get('rounds', 1))} up to C = 1000 and {results.get('rounds', 1)} above.",
        "",
        "## Targets",
        "",
        "| target | measured | result |",
        "|---|---|---|",
    ]
    lines += [f"| {t['target']} | {t['value'] or '-'} | {_mark(t['pass'])} |" for t in results["targets"]]
    lines += h2report.markdown(results)
    lines += [
        "",
        "## Paced streams, Python load (first token, per-event times)",
        "",
        "What h2load cannot see: the first text token and every event's time, from Python load processes (grpc.aio,",
        "one channel per 100 streams; aiohttp for SSE; one process per 500 streams, started together). CPU % is the",
        "server's over the level and the busiest load process's over its own measuring window (medians over the",
        "rounds); **sat.** counts the rounds in which a load process used more than",
        f"{results.get('saturated_pct', 70):g} % of a core: they are left out of the ratios.",
        "",
        "| system | C | first event p50 | first event p99 | first token p50 | first token p99 | total p99 "
        "| events/s | server CPU s / 1k events | CPU % server / load | RSS KiB / stream | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for system in SYSTEMS:
        for row in results["paced"].get(system, []):
            errs = row["errors"] if not row["error_kinds"] else f"{row['errors']} {row['error_kinds']}"
            lines.append(
                f"| {LABELS[system]} | {row['streams']} | {_ms(row, 'first_event_p50_ms')} | "
                f"{_ms(row, 'first_event_p99_ms')} | {_ms(row, 'first_token_p50_ms')} | "
                f"{_ms(row, 'first_token_p99_ms')} | {_ms(row, 'total_p99_ms')} | {row['events_per_s']:.0f} | "
                f"{row['cpu_s_per_1k_events']:.3f} | {_cpu(row)} | {row['rss_per_stream_bytes'] / KIB:.1f} | {errs} |"
            )
    lines += ["", "## Ratios: agent service ÷ other system (first event p99, first token p99, events/s)", ""]
    lines += [
        "Python load. Medians of the per-round ratios (the systems took turns within each round), with the lowest",
        "and highest round in brackets; rounds in which the load process used more than"
        f" {results.get('saturated_pct', 70):g} % of a core are left",
        "out (it then measures itself), and a ratio with no round left says *saturated*. The naive pattern ran one",
        "round.",
        "",
        "| vs | C | first event p99 | first token p99 | events/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for other in SYSTEMS[1:]:
        for c in results["levels"]:
            s, o = _level(results, "service", c), _level(results, other, c)
            if s and o:
                cells = [ratio_cell(s, o, k) for k in ("first_event_p99_ms", "first_token_p99_ms", "events_per_s")]
                lines.append(f"| {LABELS[other]} | {c} | {' | '.join(cells)} |")
    lines += ["", f"## Unpaced throughput ({results['unpaced_events']:,} small events per stream)", ""]
    lines += [
        "Workload events/s counts the run's events as the bare server sends them. The service by default merges",
        "back-to-back text deltas at the source (`runs.coalesce_window_s`, 10 ms), so it sends far fewer, larger",
        "messages; the coalescing-off row (`coalesce_window_s: 0`, `subscriber_coalesce_lag: 1000000`) sends one",
        "message per delta, as the bare server does, and is the like-for-like comparison. Medians over the rounds;",
        "the target ratios are medians of the per-round ratios.",
        "",
        "| streams | system | workload events/s | wire messages/s | messages / stream | text chars | CPU % server /"
        " load | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, row in results["unpaced"].items():
        for system in UNPACED:
            r = row.get(system)
            if r is None:
                continue
            lines.append(
                f"| {n} | {LABELS[system]} | {r['workload_events_per_s']:.0f} | {r['events_per_s']:.0f} | "
                f"{r['events'] / r['streams']:.0f} | {r['text_chars']:.0f} | {_cpu(r)} | {r['errors']} |"
            )
    lines += [
        "",
        "## Memory per idle open stream",
        "",
        "| system | streams | open | KiB / stream |",
        "|---|---:|---:|---:|",
    ]
    for system, row in results["idle"].items():
        lines.append(f"| {LABELS[system]} | {row['streams']} | {row['ready']} | {row['per_stream_bytes'] / KIB:.1f} |")
    ov = results["overhead"]
    rounds = f", median of {ov['rounds']} processes" if ov.get("rounds", 1) > 1 else ""
    lines += ["", f"## Tool-call overhead ({ov['calls']} calls per row{rounds})", "", f"Stack: {ov['note']}.", ""]
    lines += [
        "CPU µs / call is the whole process's CPU time (the audit writer and span exporter threads included) over",
        "the calls; overhead is the path's figure minus the direct call's.",
        "",
        "| path | p50 µs | p99 µs | overhead p50 µs | overhead p99 µs | CPU µs / call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in ov["stacks"].items():
        cpu = row.get("cpu_us_per_call")
        lines.append(
            f"| {name} | {row['p50_us']:.1f} | {row['p99_us']:.1f} | {row['overhead_p50_us']:.1f} | "
            f"{row['overhead_p99_us']:.1f} | {'-' if cpu is None else f'{cpu:.1f}'} |"
        )
    lines += _start_budget(results.get("start_budget"))
    lines += ["", "![first-event p99](first_event_p99.png) ![events/s](events_per_s.png)", ""]
    return "\n".join(lines)


def _start_budget(budget: dict[str, Any] | None) -> list[str]:
    if not budget:
        return []
    cost = budget["startcost"]
    lines = [
        "",
        f"## Start budget (C = {budget['streams']})",
        "",
        "The bare server with each call first spending extra CPU, against itself unchanged: what a heavier start",
        "does to the first-event p99 ratio. In-process, starting a run (first event, and for the service the run",
        f"driver's first step) costs the agent service {cost['service_us']:.0f} µs of CPU and the bare servicer",
        f"{cost['bare_us']:.0f} µs (median of {cost['batches']} bursts of {cost['runs_per_batch']}).",
        *_live_start(budget),
        "",
        "| extra CPU µs per call | first event p99 | ratio to bare | errors |",
        "|---:|---:|---:|---:|",
    ]
    for row in budget["rows"]:
        ratio_text = "-" if row["ratio"] is None else f"{row['ratio']:.2f}"
        if row["spread"]:
            ratio_text += f" ({row['spread']})"
        lines.append(f"| {row['start_cpu_us']} | {row['first_event_p99_ms']:.1f} | {ratio_text} | {row['errors']} |")
    return lines


def _live_start(budget: dict[str, Any]) -> list[str]:
    live = budget.get("live")
    if not live:
        return []
    service, bare = live["service"], live["bare"]
    return [
        "",
        f"Live, a burst of {budget['streams']} new streams that go quiet after their first event costs the server, all",
        f"its threads and grpc's work included, {service['cpu_us_per_call']:.0f} µs of CPU per call for the agent",
        f"service and {bare['cpu_us_per_call']:.0f} µs for the bare server: {budget['live_ratio']:.2f}x (median of",
        f"{service['rounds']} bursts each, the two taking turns).",
    ]


def plots(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for key, name, ylabel in (
        ("first_event_p99_ms", "first_event_p99.png", "first-event p99 (ms, log)"),
        ("events_per_s", "events_per_s.png", "events/s (log)"),
    ):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        for system in SYSTEMS:
            rows = results["paced"].get(system, [])
            ax.plot([r["streams"] for r in rows], [max(r[key], 1e-3) for r in rows], marker="o", label=LABELS[system])
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("concurrent streams")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel.split(' (')[0]} vs concurrency ({results['date'][:10]})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    results["targets"] = h2report.targets(results) + targets(results)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    plots(results, out)
