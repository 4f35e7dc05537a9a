"""Instructions per call start and per event, in-process, counted by valgrind's callgrind: a figure that other
processes on the machine do not move, unlike CPU or wall time. `python -m bench.instructions [--system service]`
prints JSON; it runs itself under `valgrind --tool=callgrind --instr-atstart=no` twice per figure and switches the
count on (`callgrind_control -i on`) only around the measured part, after imports and the server's set-up.

- **start**: `runs` short calls (the run's start, one text delta, its end) through the servicer, `in_flight` at a
  time, each stream read to its end; the count over the runs, per run.
- **event**: the same with `events` unpaced events per run; (long run − short run) / the events it adds.

`--system service-durable`: the same calls with `on_disconnect: CONTINUE`, durable by default: the run's row, its
checkpoint per model turn and its end in data_dir/durable.db, its events in the run log (docs/durability.md).
With `--state redis://…` the service keeps its runs in that Redis (under a fresh prefix, deleted at the end), and
the count goes on until its shipper has sent every run's events and end: what the shared state adds to a run.

Each figure is the difference of two counts (`runs` and 2 × `runs` calls), so the switching and whatever else is
constant drops out. The gRPC layer is not in it (no server, no wire): it is the service's own work, the part this
code controls. The service runs with coalescing off, so that every event is one message, as in the bare server.

`--live`: the whole server process instead (`python -m service`, or `bench.bare_grpc` with `--system bare`) under
callgrind, grpc's own work and the interceptors included, while h2load sends it short calls, `in_flight` at a time
on one connection: the count over `runs` calls and over 2 × `runs` (switched on and dumped with `callgrind_control`
around each h2load run, after a warm-up), per call. Two figures: every thread of the process (the keepalive and
metrics threads and grpc's poller too, whose work grows with wall time under valgrind: two live runs of the same
code differ by up to about 5 %), and the main thread alone, the event loop's, where the service's own work and
grpc's per-call Python layer run (callgrind's `--separate-threads=yes`, thread 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.workload import Workload

SHORT_EVENTS = 4  # run_started, one text delta, usage, final_response


async def _drive(
    system: str,
    events: int,
    runs: int,
    in_flight: int,
    state: str = "",
    summaries: bool = False,
    mark: Callable[[bool], None] | None = None,
) -> None:
    """`mark(True)` and `mark(False)` around the measured part (default: switch callgrind's count on and off)."""
    mark = mark or _count
    import grpc  # noqa: F401  (imported before counting, as everything the measured part touches)

    from agent.v1 import agent_pb2 as pb
    from bench.bare_grpc import BareServicer
    from bench.procs import SERVICE_RUNS
    from bench.startcost import _Context
    from bench.workload import timeline, write_service_config
    from service.config import load_config
    from service.rpc.server import tune_gc
    from service.wiring import start

    workload = Workload().unpaced(events)
    request = pb.RunAgentRequest(message="hello", tools=["bench_sleep"])
    if system == "service-durable":
        request.on_disconnect = pb.RunAgentRequest.CONTINUE
    context: Any = _Context()
    with tempfile.TemporaryDirectory(prefix="agent-instr-") as tmp:
        service = None
        prefix = f"bench:instr:{os.getpid()}:"
        if system.startswith("service"):
            extra = {"state": {"url": state, "prefix": prefix}} if state else None
            runs_config = (
                {**SERVICE_RUNS["service-raw"], "keep_summaries": True} if summaries else SERVICE_RUNS["service-raw"]
            )
            config = load_config(write_service_config(workload, Path(tmp), 0, 0, runs_config, extra=extra))
            service = await start(config, metrics=False)
            tune_gc(config.gc)
            open_stream = lambda: service.servicer.RunAgent(request, context)  # noqa: E731
        else:
            bare = BareServicer(timeline(workload))
            open_stream = lambda: bare.RunAgent(request, context)  # noqa: E731

        async def one() -> int:
            return sum([1 async for _ in open_stream()])

        async def batch(n: int) -> None:
            for i in range(0, n, in_flight):
                got = await asyncio.gather(*(one() for _ in range(min(in_flight, n - i))))
                assert all(g == events for g in got), got

        store: Any = service.registry.store if service is not None else None
        await batch(in_flight)  # warm-up: caches, first-call paths
        if store is not None:
            await store.shipper.flushed(60)
        if service is not None:
            await service.registry.summary_writer.flushed(60)
        mark(True)
        await batch(runs)
        if store is not None:
            await store.shipper.flushed(60)  # the runs' shipping counts too
        if service is not None:
            await service.registry.summary_writer.flushed(60)  # and so do their summaries' writes
        mark(False)
        if service is not None:
            await service.server.stop(0)
            await service.close()
        if state:
            from bench.replicas import delete_keys

            delete_keys(state, prefix)


def _count(on: bool) -> None:
    if os.environ.get("AGENT_INSTR_INNER"):
        flag = "on" if on else "off"
        subprocess.run(["callgrind_control", "-i", flag, str(os.getpid())], check=True, capture_output=True)


def count(
    system: str, events: int, runs: int, in_flight: int, state: str = "", keep: str = "", summaries: bool = False
) -> int:
    """Instructions callgrind counted over the measured part of one inner run; its output is copied into the folder
    `keep` when given (`callgrind_annotate --inclusive=yes FILE` lists the functions by their inclusive count)."""
    with tempfile.TemporaryDirectory(prefix="agent-callgrind-") as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        cmd += [sys.executable, "-m", "bench.instructions", "--inner", system, str(events), str(runs), str(in_flight)]
        cmd += ["--state", state] if state else []
        cmd += ["--summaries"] if summaries else []
        env = dict(os.environ, AGENT_INSTR_INNER="1", PYTHONMALLOC="malloc", GRPC_VERBOSITY="ERROR")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(out, Path(keep) / f"callgrind.{system}.{events}ev.{runs}runs.out")
        match = re.search(r"Collected : (\d+)", done.stderr)
        if match is None:
            raise RuntimeError(f"no count in callgrind's output: {done.stderr[-2000:]}")
        return int(match[1])


def live_count(system: str, runs: int, in_flight: int, keep: str = "") -> tuple[tuple[int, int], tuple[int, int]]:
    """The live server's instructions over `runs` short calls and over 2 × `runs` (see the module's docstring): all
    threads' counts, then the main thread's."""
    from bench import h2load, procs

    path = h2load.required()
    with tempfile.TemporaryDirectory(prefix="agent-live-") as tmp:
        folder = Path(tmp)
        out = folder / "callgrind.out"
        # procs.start runs `python -m …`: this wrapper makes that python run under callgrind, counting switched off
        valgrind = f"valgrind --tool=callgrind --instr-atstart=no --separate-threads=yes --callgrind-out-file={out}"
        wrapper = procs.python_under(folder, "python-under-callgrind", f"{valgrind} {sys.executable}")
        name = "service-raw" if system == "service" else system
        workload = Workload().unpaced(SHORT_EVENTS)
        server = procs.start(name, workload, folder, timeout=600, python=wrapper)
        try:
            body = h2load.request_file(folder)
            pid = str(server.proc.pid)

            def calls(n: int) -> None:
                done = h2load.run(path, server, body, h2load.Load(n, 1, in_flight), deadline=600)
                if done["requests"].get("succeeded") != n:
                    raise RuntimeError(f"not every call succeeded: {done['requests']}")

            calls(in_flight)  # warm-up: caches, first-call paths
            every, main = [], []
            for n in (runs, 2 * runs):
                seen = set(folder.glob("callgrind.out.*"))
                subprocess.run(["callgrind_control", "-i", "on", pid], check=True, capture_output=True)
                calls(n)
                subprocess.run(["callgrind_control", "-i", "off", pid], check=True, capture_output=True)
                subprocess.run(["callgrind_control", "-d", pid], check=True, capture_output=True)  # dumps, zeroes
                dumps = set(folder.glob("callgrind.out.*")) - seen  # one file per thread
                threads = {d: _thread_totals(d) for d in dumps}  # each file read once
                counts = dict(threads.values())
                if 1 not in counts:
                    raise RuntimeError(f"no main thread among the dumps {sorted(d.name for d in dumps)}")
                every.append(sum(counts.values()))
                main.append(counts[1])
                if keep:
                    Path(keep).mkdir(parents=True, exist_ok=True)
                    for d, (thread, _) in threads.items():
                        shutil.copy(d, Path(keep) / f"callgrind.live.{system}.{n}runs.thread{thread}.out")
        finally:
            server.stop()
        return (every[0], every[1]), (main[0], main[1])


def _thread_totals(dump: Path) -> tuple[int, int]:
    """The thread a dump of `--separate-threads=yes` counts (its `thread:` line, else its name's `-NN`) and its count
    (`totals:`; the header's `summary:` reads 0 in a dump of a running process)."""
    text = dump.read_text()
    thread = re.search(r"^thread: (\d+)", text, re.MULTILINE) or re.search(r"-(\d+)$", dump.name)
    totals = re.search(r"^totals: (\d+)", text, re.MULTILINE)
    if thread is None or totals is None:
        raise RuntimeError(f"no thread or no totals in {dump}")
    return int(thread[1]), int(totals[1])


def measure_live(system: str, runs: int, in_flight: int, keep: str = "") -> dict[str, Any]:
    (once, twice), (main_once, main_twice) = live_count(system, runs, in_flight, keep)
    return {
        "system": system,
        "live": True,
        "runs": runs,
        "in_flight": in_flight,
        "instructions_per_start": round((twice - once) / runs),
        "main_thread_instructions_per_start": round((main_twice - main_once) / runs),
    }


def measure(
    system: str, runs: int, in_flight: int, events: int, state: str = "", keep: str = "", summaries: bool = False
) -> dict[str, Any]:
    def per_run(n_events: int) -> float:
        twice = count(system, n_events, 2 * runs, in_flight, state, keep, summaries)
        return (twice - count(system, n_events, runs, in_flight, state, keep, summaries)) / runs

    short = per_run(SHORT_EVENTS)
    long = per_run(events) if events != SHORT_EVENTS else short
    return {
        "system": system,
        "state": state or "memory://",
        "summaries": summaries,
        "runs": runs,
        "in_flight": in_flight,
        "events": events,
        "instructions_per_start": round(short),
        "instructions_per_event": round((long - short) / (events - SHORT_EVENTS)) if events != SHORT_EVENTS else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--system", choices=("service", "service-durable", "bare"), default="service")
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--in-flight", type=int, default=20)
    parser.add_argument("--events", type=int, default=100)
    parser.add_argument("--state", default="", help="a redis:// URL: the service's runs there (default: memory://)")
    parser.add_argument("--summaries", action="store_true", help="runs.keep_summaries: each run's summary to SQLite")
    parser.add_argument("--live", action="store_true", help="the whole server process under h2load's short calls")
    parser.add_argument("--keep", default="", help="a folder to keep callgrind's output files in, for a profile")
    parser.add_argument("--inner", nargs=4, metavar=("SYSTEM", "EVENTS", "RUNS", "IN_FLIGHT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        system, events, runs, in_flight = args.inner
        asyncio.run(_drive(system, int(events), int(runs), int(in_flight), args.state, args.summaries))
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is missing: apt-get install valgrind")
    if args.live:
        print(json.dumps(measure_live(args.system, args.runs, args.in_flight, args.keep)))
        return
    print(
        json.dumps(measure(args.system, args.runs, args.in_flight, args.events, args.state, args.keep, args.summaries))
    )


if __name__ == "__main__":
    main()
