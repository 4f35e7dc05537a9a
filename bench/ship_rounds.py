"""How long shipping rounds hold the event loop, and what the Redis server is asked, at C=1000-like load, in
process: `runs` paced runs (as bench/workload.py's: an event every 20 ms, `events` of them) started over `ramp_s` (a
burst of starts, as h2load's C connections bring), driven by the real store against a Redis started here.

    python -m bench.ship_rounds [--runs 1000] [--events 35] [--ramp-s 1.0]

Prints JSON: the rounds (count, runs a round, the time each held the loop), the loop's lag (a 1 ms timer's
lateness: p50, p99, max), this process's CPU a run, and per run the Redis server's commands (top level and inside
scripts, `INFO commandstats`), the connections it accepted (`INFO stats`) and its CPU (`INFO cpu`). Times and CPU
are the loaded machine's, indicative only: compare runs of the same code taken in turns; the counts are exact.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from typing import Any

import redis

from bench.redis_cost import counters, own_redis
from service import events as ev
from service.config import CallerConfig, GcConfig, StateConfig
from service.control import RunControl
from service.loop import RunSpec
from service.rpc.server import tune_gc
from service.run import Run

INTERVAL_S = 0.020


def _pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))] if ordered else 0.0


async def _drive(run: Run, events: int) -> None:
    run.append(ev.RunStarted(model="m", tools=(), max_turns=1))
    for _ in range(events - 2):
        await asyncio.sleep(INTERVAL_S)
        run.append(ev.TextDelta(turn=1, text="some words "))
    run.append(
        ev.FinalResponse(
            text="done", stop_reason="end", turns=1, tool_calls=0, input_tokens=1, output_tokens=1, duration_s=0.1
        )
    )
    run.finish()


async def _ticker(lags: list[float], stop: asyncio.Event) -> None:
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        due = loop.time() + 0.001
        await asyncio.sleep(0.001)
        lags.append(loop.time() - due)


def _instrument(shipper: Any) -> list[dict[str, float]]:
    """Each round's runs, and how long it held the loop: the shipper's own `held_s` where it keeps one, else (the
    code before it) the time from the round's start to its script call plus from the reply to its end."""
    rounds: list[dict[str, float]] = []
    ship, script = shipper._ship, shipper._script
    now = time.perf_counter
    current: dict[str, float] = {}

    async def timed_script(**kwargs: Any) -> Any:
        current["held"] = now() - current.pop("mark")
        answer = await script(**kwargs)
        current["mark"] = now()
        return answer

    async def timed_ship(batch: dict[str, Run]) -> list[Run]:
        current.clear()
        current.update(runs=len(batch), mark=now())
        left = await ship(batch)
        held = current.get("held", 0.0) + now() - current.pop("mark")
        rounds.append({"runs": len(batch), "held_ms": getattr(shipper, "held_s", held) * 1000})
        return left

    shipper._ship = timed_ship
    shipper._script = timed_script
    return rounds


async def measure(url: str, runs: int, events: int, ramp_s: float) -> dict[str, Any]:
    from service.state.redis_runs import RedisRunStore

    async def health(up: bool) -> None:
        pass

    tune_gc(GcConfig())  # as the server does: a full collection of the start's objects costs a ~70 ms stall
    config = StateConfig(url=url, prefix=f"ship-rounds:{secrets.token_hex(3)}:")
    store = RedisRunStore(config, retention_s=60, max_run_s=60, on_health=health)
    await store.start()
    rounds = _instrument(store.shipper)
    probe = redis.Redis.from_url(url)
    before = counters(probe)
    cpu = time.process_time()
    lags: list[float] = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(lags, stop))
    drivers = []
    limits = CallerConfig(name="c")
    for i in range(runs):
        spec = RunSpec(
            run_id=f"run_{secrets.token_hex(6)}",
            message="m",
            model="m",
            system=None,
            max_turns=1,
            max_tokens=1,
            tools=(),
        )
        run = store.new_run(spec, RunControl(), caller="c", key="", fingerprint="")
        await store.admit(run, key="", fingerprint="", limits=limits)
        drivers.append(asyncio.create_task(_drive(run, events)))
        if ramp_s and i % 10 == 9:
            await asyncio.sleep(ramp_s * 10 / runs)
    await asyncio.gather(*drivers)
    await store.shipper.flushed(30)
    cpu = time.process_time() - cpu
    stop.set()
    await ticker
    after = counters(probe)
    await store.close()
    probe.close()
    per_command = {
        name: round((calls - before["commands"].get(name, 0)) / runs, 3)
        for name, calls in after["commands"].items()
        if calls > before["commands"].get(name, 0) and name != "info"
    }
    held = [r["held_ms"] for r in rounds]
    return {
        "runs": runs,
        "events": events,
        "ramp_s": ramp_s,
        "rounds": len(rounds),
        "runs_a_round": {
            "mean": round(sum(r["runs"] for r in rounds) / len(rounds), 1),
            "max": max(r["runs"] for r in rounds),
        },
        "held_ms": {"p50": round(_pct(held, 0.5), 2), "p99": round(_pct(held, 0.99), 2), "max": round(max(held), 2)},
        "held_ms_total": round(sum(held), 1),
        "loop_lag_ms": {p: round(_pct(lags, q) * 1000, 2) for p, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))},
        "process_cpu_usec_per_run": round(cpu * 1e6 / runs, 1),
        "redis_per_run": {
            "commands": per_command,
            "processed": round((after["processed"] - before["processed"]) / runs, 2),
            "connections": round((after["connections"] - before["connections"]) / runs, 4),
            "cpu_usec": round((after["cpu_s"] - before["cpu_s"]) * 1e6 / runs, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--events", type=int, default=35)
    parser.add_argument("--ramp-s", type=float, default=1.0)
    args = parser.parse_args()
    with own_redis() as url:
        print(json.dumps(asyncio.run(measure(url, args.runs, args.events, args.ramp_s))))


if __name__ == "__main__":
    main()
