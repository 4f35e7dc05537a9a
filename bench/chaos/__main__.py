"""`python -m bench.chaos`: one chaos round on the real Redis and PostgreSQL; prints the figures and every
violation, writes them as JSON with `--json`, and exits 1 on any violation."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.chaos.checks import Report
from bench.chaos.harness import Plan, own_backends, render, run_chaos

REDIS_URL = os.environ.get("AGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("AGENT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chaos", description=__doc__)
    parser.add_argument("--replicas", type=int, default=Plan.replicas)
    parser.add_argument("--runs", type=int, default=Plan.in_flight, help="runs in flight at any time")
    parser.add_argument("--duration", type=float, default=Plan.duration_s, help="seconds of kills")
    parser.add_argument("--kill-every", type=float, default=Plan.kill_every_s, help="mean seconds between kills")
    parser.add_argument("--restart-after", type=float, default=Plan.restart_after_s)
    parser.add_argument("--settle", type=float, default=Plan.settle_s, help="seconds the runs have to end after")
    parser.add_argument("--seed", type=int, default=Plan.seed)
    parser.add_argument(
        "--embedded", action="store_true", help="one replica on the embedded default (SQLite, no Redis/PostgreSQL)"
    )
    parser.add_argument("--workdir", type=Path, help="replicas' data and logs (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the figures and violations here")
    args = parser.parse_args(argv)
    plan = Plan(
        replicas=1 if args.embedded else args.replicas,
        in_flight=args.runs,
        duration_s=args.duration,
        kill_every_s=args.kill_every,
        restart_after_s=args.restart_after,
        settle_s=args.settle,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        report = asyncio.run(_round(workdir, plan, args.embedded))
        print(render(report, plan))
        if args.json:
            args.json.write_text(json.dumps(as_json(report, plan), indent=2) + "\n")
        if report.violations and args.workdir is None:
            print(f"(replica logs were in {workdir}; pass --workdir to keep them)", file=sys.stderr)
    return 1 if report.violations else 0


async def _round(workdir: Path, plan: Plan, embedded: bool) -> Report:
    if embedded:
        return await run_chaos(workdir, None, plan)
    async with own_backends(REDIS_URL, POSTGRES_URL) as backends:
        return await run_chaos(workdir, backends, plan)


def as_json(report: Report, plan: Plan) -> dict[str, Any]:
    return {
        "plan": plan.__dict__,
        "figures": report.figures(),
        "violations": report.violations,
        "machine": {
            "cpu": _cpu(),
            "cores": os.cpu_count(),
            "load": os.getloadavg(),
            "python": platform.python_version(),
        },
    }


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
