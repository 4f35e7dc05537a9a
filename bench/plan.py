"""What a benchmark run does at each size (`Plan`, one per mode), and how systems take turns in rounds so that a
noisy spell on a shared machine hits every system of a comparison alike (`take_turns`)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from bench.procs import Server
from bench.workload import SMOKE, Workload

K = TypeVar("K")

# A load generator busier than this share of one core over a round is flagged saturated: its own queueing then
# delays both systems of a comparison alike and squeezes their ratio toward 1, so such rounds leave the ratios.
SATURATED_PCT = 70.0


@dataclass(frozen=True)
class Plan:
    mode: str
    levels: tuple[int, ...] = (1, 100, 1000)
    workload: Workload = Workload()
    unpaced_streams: tuple[int, ...] = (1, 100)
    unpaced_events: int = 1000
    idle_streams: int = 1000
    deadline_s: float = 60.0
    naive_deadline_s: float = 20.0
    warmup_streams: int = 20
    overhead_calls: int = 20000
    settle_s: float = 1.0  # idle streams: wait this long before reading the server's memory
    rounds: int = 3  # paced levels: the systems take turns this many times; figures are medians over the rounds
    rounds_small: int = 9  # at C <= 100, where a round takes seconds and one noisy round sways a median of three
    # at 100 < C <= 1000 (a round takes about 20 s): with three rounds, two full runs read 1.15x and 1.29x
    rounds_mid: int = 5
    # start budget: the bare server at C = budget_streams, spending each of these CPU µs at every call's start
    budget_streams: int = 100
    budget_cpu_us: tuple[int, ...] = (0, 100, 200, 300)
    startcost_batches: int = 30
    # h2load: the levels it drives (None: `levels`), streams per connection for request times, and the calls of
    # the server-CPU stage (short calls for a call's start, long ones for the events), `cpu_in_flight` at a time
    h2load_levels: tuple[int, ...] | None = None
    streams_per_connection: int = 100
    cpu_start_calls: int = 2000
    cpu_event_calls: int = 100
    cpu_in_flight: int = 100

    def rounds_at(self, c: int) -> int:
        if c <= 100:
            return self.rounds_small
        return self.rounds_mid if c <= 1000 else self.rounds


PLANS = {
    "default": Plan("default"),
    "full": Plan("full", levels=(1, 100, 1000, 5000), idle_streams=5000, deadline_s=120.0),
    "smoke": Plan(
        "smoke",
        levels=(1, 5),
        workload=SMOKE,
        unpaced_streams=(1, 5),
        unpaced_events=100,
        idle_streams=5,
        deadline_s=20.0,
        naive_deadline_s=5.0,
        warmup_streams=2,
        overhead_calls=2000,
        settle_s=0.2,
        rounds=2,
        rounds_small=2,
        rounds_mid=2,
        budget_streams=5,
        budget_cpu_us=(0, 200),
        startcost_batches=3,
        h2load_levels=(5,),
        streams_per_connection=5,
        cpu_start_calls=50,
        cpu_event_calls=5,
        cpu_in_flight=5,
    ),
}


def say(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


Measure = Callable[[Server, int, float], dict[str, Any]]


def take_turns(
    starters: Mapping[K, Callable[[], Server]], c: int, plan: Plan, measure: Measure
) -> dict[K, list[dict[str, Any]]]:
    """Start one server per key, warm each up, then `measure` them at C = `c` taking turns, `plan.rounds_at(c)`
    times in a rotating order: the rows of each key's rounds. The servers are stopped at the end."""
    keys = list(starters)
    rounds: dict[K, list[dict[str, Any]]] = {k: [] for k in keys}
    servers: dict[K, Server] = {}
    try:
        for k in keys:
            servers[k] = starters[k]()
            measure(servers[k], min(plan.warmup_streams, c), plan.deadline_s)  # warm-up, not kept
        for i in range(plan.rounds_at(c)):
            for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
                rounds[k].append(measure(servers[k], c, plan.deadline_s))
    finally:
        for server in servers.values():
            server.stop()
    return rounds
