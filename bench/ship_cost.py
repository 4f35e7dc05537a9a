"""CPU per event of shipping runs to Redis, in process: K runs each log a text delta every 2 ms for a few seconds
(a paced stream: a shipping round carries two or three events a run), through the real store and a real Redis.
`memory` logs the same into plain runs, for the cost of logging alone; the difference is the shipping.

    python -m bench.ship_cost redis://127.0.0.1:6399/0 [K]   # a Redis of your own: it gets K runs' keys
    python -m bench.ship_cost memory [K]
"""

from __future__ import annotations

import asyncio
import secrets
import sys
import time

from service import events as ev
from service.config import CallerConfig, StateConfig
from service.control import RunControl
from service.loop import RunSpec
from service.run import Run

PERIOD_S = 0.002
SECONDS = 3.0


def spec() -> RunSpec:
    return RunSpec(
        run_id=f"run_{secrets.token_hex(6)}", message="m", model="m", system=None, max_turns=1, max_tokens=1, tools=()
    )


async def log_events(runs: list[Run]) -> tuple[int, float]:
    """Events logged and the process's CPU seconds, until every run's events are out."""
    loop = asyncio.get_running_loop()
    cpu, began, events = time.process_time(), loop.time(), 0
    while loop.time() - began < SECONDS:
        for run in runs:
            run.append(ev.TextDelta(turn=1, text="some words of a reply "))
            events += 1
        await asyncio.sleep(PERIOD_S)
    return events, time.process_time() - cpu


async def main(url: str, k: int) -> None:
    if url == "memory":
        events, cpu = await log_events(
            [Run(spec(), RunControl(), caller="c", key="", fingerprint="") for _ in range(k)]
        )
    else:
        from service.state.redis_runs import RedisRunStore

        async def health(up: bool) -> None:
            pass

        config = StateConfig(url=url, prefix=f"ship-cost:{secrets.token_hex(3)}:")
        store = RedisRunStore(config, retention_s=60, max_run_s=60, on_health=health)
        await store.start()
        runs = [store.new_run(spec(), RunControl(), caller="c", key="", fingerprint="") for _ in range(k)]
        for run in runs:
            await store.admit(run, key="", fingerprint="", limits=CallerConfig(name="c"))
        await asyncio.sleep(0.5)  # connections made, first shipments out
        cpu_before = time.process_time()
        events, _ = await log_events(runs)
        await store.shipper.flushed(10)
        cpu = time.process_time() - cpu_before
        await store.close()
    print(f"{url} K={k}: {events} events, {cpu:.3f} s CPU, {cpu / events * 1e6:.1f} µs an event")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 100))
