"""Python-level calls per gRPC call of a live server's main thread, under h2load's short calls: what the service does
per call that the bare server does not, function by function. `python -m bench.liveprof [--system service|bare]
[--calls 4000] [--in-flight 100] [--top 40]` prints JSON: Python calls, event-loop passes and profiled µs per call,
and the functions called most per call.

The server runs as `python -m service` (coalescing off) or `bench.bare_grpc` as in the bench, but under cProfile on
its main thread, the event loop's (this module's `--serve` mode wraps it: SIGUSR1 starts the count afresh, SIGUSR2
writes it out). The count starts after a warm-up of `in_flight` × 5 calls and covers `calls` calls. cProfile slows
every Python call, so its times are inflated; its counts are not, and they are what to compare: the number of calls
a function makes per gRPC call does not depend on the machine. Compiled code (grpc's Cython layer, protobuf's upb)
is seen only where Python calls into it or it calls Python.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import runpy
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import h2load, procs
from bench.h2bench import START_EVENTS
from bench.workload import Workload


def _serve(out: str, argv: list[str]) -> None:
    """Run `python -m MODULE ARGS` (argv: `-m MODULE ARGS...`) under cProfile; SIGUSR1 resets, SIGUSR2 dumps."""
    profile = cProfile.Profile()

    def reset(*_: Any) -> None:
        nonlocal profile
        profile.disable()
        profile = cProfile.Profile()
        profile.enable()

    def dump(*_: Any) -> None:
        profile.disable()
        profile.dump_stats(f"{out}.part")
        os.replace(f"{out}.part", out)  # whole or not there: the measuring process waits for the name
        profile.enable()

    signal.signal(signal.SIGUSR1, reset)
    signal.signal(signal.SIGUSR2, dump)
    if argv[:1] != ["-m"] or len(argv) < 2:
        sys.exit(f"--serve runs `-m MODULE ARGS`, not {argv!r}")
    sys.argv = [argv[1], *argv[2:]]
    profile.enable()
    runpy.run_module(argv[1], run_name="__main__", alter_sys=True)


def measure(system: str, calls: int, in_flight: int, top: int) -> dict[str, Any]:
    path = h2load.required()
    with tempfile.TemporaryDirectory(prefix="agent-liveprof-") as tmp:
        folder = Path(tmp)
        out = folder / "profile.out"
        profiled = f"{sys.executable} -m bench.liveprof --serve {out}"
        wrapper = procs.python_under(folder, "python-under-cprofile", profiled)
        name = "service-raw" if system == "service" else system  # the CPU stage's short call, one message an event
        server = procs.start(name, Workload().unpaced(START_EVENTS), folder, timeout=120, python=wrapper)
        try:
            body = h2load.request_file(folder)

            def run(n: int) -> None:
                load = h2load.Load(n, max(1, n // in_flight), in_flight)
                done = h2load.run(path, server, body, load, deadline=600)
                if done["requests"].get("succeeded") != n:
                    raise RuntimeError(f"not every call succeeded: {done['requests']}")

            run(in_flight * 5)  # warm-up: first-call paths, caches
            os.kill(server.proc.pid, signal.SIGUSR1)
            run(calls)
            os.kill(server.proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 30
            while not out.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server wrote no profile in 30 s; its log: {server.log_path}")
                time.sleep(0.05)
        finally:
            server.stop()
        return summarize(system, pstats.Stats(str(out)), calls, in_flight, top)


def summarize(system: str, stats: pstats.Stats, calls: int, in_flight: int, top: int) -> dict[str, Any]:
    """Per gRPC call: Python-level calls, event-loop passes (`_run_once`), profiled µs, and the `top` functions by
    calls."""
    table: dict[tuple[str, int, str], tuple[int, int, float, float, Any]] = stats.stats  # type: ignore[attr-defined]
    per_function = {f"{Path(file).name}:{line}({fn})": counts[1] / calls for (file, line, fn), counts in table.items()}
    passes = sum(c[1] for (file, _, fn), c in table.items() if fn == "_run_once" and file.endswith("base_events.py"))
    busiest = sorted(per_function.items(), key=lambda kv: -kv[1])[:top]
    return {
        "system": system,
        "calls": calls,
        "in_flight": in_flight,
        "python_calls_per_call": round(stats.total_calls / calls, 1),  # type: ignore[attr-defined]
        "loop_passes_per_call": round(passes / calls, 2),
        "profiled_us_per_call": round(stats.total_tt / calls * 1e6, 1),  # type: ignore[attr-defined]
        "functions_per_call": {name: round(n, 2) for name, n in busiest},
    }


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        _serve(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("service", "bare"), default="service")
    parser.add_argument("--calls", type=int, default=4000, help="short calls counted (after a warm-up)")
    parser.add_argument("--in-flight", type=int, default=100, help="calls at a time, on one connection per 100")
    parser.add_argument("--top", type=int, default=40, help="functions listed, by calls per gRPC call")
    args = parser.parse_args()
    print(json.dumps(measure(args.system, args.calls, args.in_flight, args.top), indent=1))


if __name__ == "__main__":
    main()
