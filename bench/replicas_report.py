"""The replica benchmarks' Markdown (`bench.replicas`): every comparison's goals, then its figures with the per-round
ratios and each round's load."""

from __future__ import annotations

from typing import Any


def _rounds(results: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        r
        for comp in results.get("comparisons", {}).values()
        for level in comp["levels"].values()
        for row in level["rows"].values()
        for r in row["rounds"]
    ]


def _num(value: float, unit: str) -> str:
    return f"{value:,.0f} {unit}" if value >= 100 else f"{value:.1f} {unit}"


def markdown(results: dict[str, Any], machine: dict[str, Any]) -> str:
    """The tables: every comparison's goals, then its figures with the per-round ratios and each round's load."""
    if "skipped" in results:
        return f"# Replica benchmarks\n\n**Not run.** {results['skipped']}\n"
    m = machine
    lines = [
        "# Replica and durable-run benchmarks (issues 16 and 18), paired",
        "",
        f"{results['date']}, `python -m bench.replicas`, the {results['mode']} plan, {results['elapsed_s'] / 60:.0f} "
        f"min, at `{results['commit'][:7]}`.",
        "",
        f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']:.1f} GiB, Python {m['python']}, grpcio "
        f"{m['grpcio']}, {m['platform']}; {results['version']}; Redis {results['redis_version']} on the same machine. "
        f"Load average (1 min): {results['loadavg'][0]:.1f} at the start, {results['loadavg'][1]:.1f} at the end.",
        "",
        f"A round on one server: h2load with C streams on C connections (time to first byte, per connection), then "
        f"{results['waves']} × C streams on those C connections one after the other (C in flight: request times, "
        f"completed streams/s; events/s = streams/s × {results['events_per_stream']} workload events).",
        "",
        "A ratio is the candidate ÷ the baseline, the median of the per-round ratios (lowest–highest round). A round "
        f"leaves the ratios when h2load used more than {results['saturated_pct']:.0f} % of a core, or when streams "
        "failed on either side: h2load reads no trailers, so each run's streams are checked against the runs the "
        "service completed with status OK (its /metrics), and a refused call, which ends at once, would flatter the "
        "figures; completed streams/s count only the OK ones.",
        "",
        "h2load reports no percentile of the time to first byte, so its max (the slowest of C connections, above the "
        "p99) stands for the p99. Server CPU is the service's processes' (the supervisor and its workers); Redis CPU "
        "is the Redis server's over the round, whoever else used it.",
    ]
    for comp in results["comparisons"].values():
        for c, level in comp["levels"].items():
            lines += ["", f"## {comp['title']}, C = {c}", "", "| goal | measured | result |", "|---|---:|---|"]
            lines += [f"| {g['goal']} | {g['value']} | {g['verdict']} |" for g in level["goals"]]
            names = list(level["rows"])
            base, cand = level["rows"][names[0]], level["rows"][names[1]]
            lines += [
                "",
                f"| figure | {names[0]} | {names[1]} | {names[1]} ÷ {names[0]} | per round | left out |",
                "|---|---:|---:|---:|---|---:|",
            ]
            for f in level["figures"]:
                ratio = (
                    "-" if f["ratio"] is None else f"{f['ratio']:.2f} ({min(f['ratios']):.2f}–{max(f['ratios']):.2f})"
                )
                per_round = " ".join(f"{x:.2f}" for x in f["ratios"])
                lines.append(
                    f"| {f['figure']} | {_num(f['baseline'], f['unit'])} | {_num(f['candidate'], f['unit'])} | "
                    f"{ratio} | {per_round} | {f['left_out']}/{f['rounds']} |"
                )
            lines += [
                "",
                "| round | " + " | ".join(f"{n}: h2load CPU, load avg, failed streams" for n in names) + " |",
                "|---|---|---|",
            ]
            for i, (b, n) in enumerate(zip(base["rounds"], cand["rounds"], strict=True), 1):
                cells = [
                    f"{r['load_cpu_pct']:.0f} %{' sat.' if r['saturated'] else ''}, {r['loadavg_1m']:.1f}, "
                    f"{r['failed_streams']}{' of ' + str(r['calls']) if r['failed_streams'] else ''}"
                    for r in (b, n)
                ]
                lines.append(f"| {i} | " + " | ".join(cells) + " |")
            if "checkpoint" in level:
                cost = level["checkpoint"]
                lines += [
                    "",
                    f"Per checkpoint write ({cost['per_run']} a run): {cost['cpu_us']:.0f} µs of extra server CPU "
                    f"(the medians' difference per stream ÷ {cost['per_run']}); {cost['bytes']:.0f} bytes of "
                    f"SQLite file per row ({cost['rows']:,} rows so far).",
                ]
    rounds = _rounds(results)
    failed = sum(r["failed_streams"] for r in rounds)
    errors = sum(r.get("errors", 0) for r in rounds) - failed
    lines += [
        "",
        f"Streams not completed OK over all rounds: {failed} of {sum(r['calls'] for r in rounds)} (errors h2load saw "
        f"itself: {errors}). Every server's first stream went through a real client.",
    ]
    return "\n".join(lines) + "\n"
