"""A process that drives durable runs and then hangs, for tests/test_durable_store.py to `kill -9`: opens a checkpoint
store (`pg URL OWNER N` or `sqlite PATH DATA_DIR N`, the owner then from DATA_DIR), begins N runs with one step each,
prints their ids and `ready`, and waits for ever."""

import asyncio
import sys
from pathlib import Path

from service.durable.base import DurableRun, Step
from service.durable.executor_id import executor_id


async def main(kind: str, where: str, who: str, n: int) -> None:
    if kind == "pg":
        from service.durable.postgres import PgCheckpointStore

        store = PgCheckpointStore(where, who)
    else:
        from service.durable.sqlite import SqliteCheckpointStore

        store = SqliteCheckpointStore(Path(where), executor_id(Path(who)))
    await store.open()
    ids = [f"held-{i}" for i in range(n)]
    for run_id in ids:
        await store.begin(DurableRun(run_id=run_id, caller="c", owner="", state="running", request={"i": run_id}))
    await asyncio.gather(
        *(store.put(Step(run_id=r, step_no=1, kind="turn", key="turn:1", value={"text": r}, seq=5)) for r in ids)
    )
    print(" ".join(ids), flush=True)
    print("ready", flush=True)
    await asyncio.Event().wait()


asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
