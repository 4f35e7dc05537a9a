"""CPU of the durable queue's operations in the PostgreSQL checkpoint store, in-process (process CPU, all threads: the
machine's load does not distort it), in a scratch schema it drops after. Prints one JSON line (ms per operation).

    python -m bench.queue_cost --runs 500 --pg postgresql://postgres@127.0.0.1:5432/test

`submit`: what SubmitRun adds on a fleet (the bound's count, then the enqueue's pipelined transaction); `position`:
one GetRun's queue position with `--runs` waiting; `claim`: one claim of one run (a process with one free slot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import time
from urllib.parse import quote

import psycopg

from service.durable.base import DurableRun
from service.durable.postgres import PgCheckpointStore

WARM_UP = 20


async def measure(url: str, runs: int) -> dict[str, float]:
    schema = f"bench_{secrets.token_hex(6)}"
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in url else "?"
    store = PgCheckpointStore(f"{url}{sep}options={quote(f'-csearch_path={schema}')}", "bench", recover_interval_s=60)
    try:
        await store.open()
        request = {"message": "go " * 50}  # a small RunSpec's worth of JSON
        queued = [
            DurableRun(run_id=f"r{i}", caller="c", owner="", state="queued", request=request, background=True)
            for i in range(WARM_UP + runs)
        ]
        for run in queued[:WARM_UP]:
            await store.enqueue(run, limit=len(queued))
        await store.claim_queued(WARM_UP)
        start = time.process_time()
        for run in queued[WARM_UP:]:
            await store.queued()
            await store.enqueue(run, limit=len(queued))
        submitted = time.process_time()
        last = queued[-1].run_id
        for _ in range(100):
            await store.queue_position(last)
        positioned = time.process_time()
        claimed = 0
        while batch := await store.claim_queued(1):
            claimed += len(batch)
        done = time.process_time()
    finally:
        await store.aclose()
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return {
        "submit_ms": round(1000 * (submitted - start) / runs, 3),
        "position_ms": round(1000 * (positioned - submitted) / 100, 3),
        "claim_ms": round(1000 * (done - positioned) / max(claimed, 1), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--pg", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    print(json.dumps({"runs": args.runs, **asyncio.run(measure(args.pg, args.runs))}))


if __name__ == "__main__":
    main()
