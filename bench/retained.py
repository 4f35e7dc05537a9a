"""What an ended run costs while it stays watchable: bytes and objects the garbage collector tracks, per run.

The registry keeps every ended run for `runs.retention_s` (up to `runs.max_retained_runs`), so that `WatchRun` and
`GetRun` find it. Its bytes are memory; its tracked objects are work for every collection that scans them: each is
scanned by the young collection it survives, then again by each full collection while it is kept. With 10,000 runs
kept, an object a run is 10,000 objects a full scan.

`python -m bench.retained [--runs N]` plays N short calls (start, one text delta, end) through the servicer
in-process, as `bench.instructions` does, and prints JSON: after a full collection, the traced bytes
(`tracemalloc`) and the objects the collector tracks (`gc.get_objects()`), each over the calls, per run; and the
time the collector took over them, per run (a time: it moves with the machine's load; the two counts do not).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import tracemalloc
from typing import Any


def measure(runs: int, in_flight: int = 20) -> dict[str, Any]:
    from bench.instructions import _drive

    seen: dict[str, float] = {"objects": 0, "bytes": 0, "gc_s": 0.0, "started": 0.0}
    counting = False  # the collector's time is taken in a second drive, without tracemalloc slowing it

    def timed(phase: str, info: dict[str, Any]) -> None:
        if not counting:
            return
        if phase == "start":
            seen["started"] = time.thread_time()
        else:
            seen["gc_s"] += time.thread_time() - seen["started"]

    def counted(on: bool) -> None:
        gc.collect()
        if on:
            tracemalloc.start()
            seen["objects"], seen["bytes"] = len(gc.get_objects()), tracemalloc.get_traced_memory()[0]
        else:
            seen["objects"] = len(gc.get_objects()) - seen["objects"]
            seen["bytes"] = tracemalloc.get_traced_memory()[0] - seen["bytes"]
            tracemalloc.stop()

    def clocked(on: bool) -> None:
        nonlocal counting
        counting = False  # the explicit collections are not the runs' cost
        gc.collect()  # each drive starts from a collected heap: the previous one's runs are gone
        counting = on

    asyncio.run(_drive("service", 4, runs, in_flight, mark=counted))
    gc.callbacks.append(timed)
    try:
        asyncio.run(_drive("service", 4, runs, in_flight, mark=clocked))
    finally:
        gc.callbacks.remove(timed)
    return {
        "runs": runs,
        "bytes_per_run": round(seen["bytes"] / runs),
        "tracked_objects_per_run": round(seen["objects"] / runs, 1),
        "gc_us_per_run": round(seen["gc_s"] / runs * 1e6, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5000, help="short calls, all kept (fewer than max_retained_runs)")
    args = parser.parse_args()
    print(json.dumps(measure(args.runs)))


if __name__ == "__main__":
    main()
