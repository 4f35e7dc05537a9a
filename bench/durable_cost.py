"""Cost of one durable checkpoint, in-process: W concurrent runs of S steps whose bodies return at once (a ~2 KB
model turn, ~1 KB tool results), checkpointed by our batched fenced writer or by DBOS. The measurement behind
`docs/decisions/0001-durable-execution-engine.md` (table A). Prints one JSON line.

    python -m bench.durable_cost ours:pg --w 100 --s 20 --pg postgresql://127.0.0.1/scratch
    python -m bench.durable_cost dbos:sqlite:json:wal --w 1 --s 200     # DBOS: `pip install dbos` first

Configurations: `none`, `store:pg`, `store:sqlite` (the service's checkpoint stores, service/durable/), with
`:log` the one node's run log too (service/state/sqlite_runs.py: each step logs `--events` events to data_dir/runs.db
and flushes them before its checkpoint, as a durable run did), `:log:joined` (the log's tables in durable.db, each
checkpoint committed with the events before it in one transaction, no flush: what the service does now), `ours:pg`,
`ours:sqlite` (the spike's writer), `dbos:pg|sqlite` plus knobs `:json` (JSON serializer), `:t8`
(8 executor threads, pool 8), `:wal` (SQLite engine in WAL, synchronous=NORMAL). DBOS keeps its tables in the
database it is given: point `--pg` at a scratch database. Not part of `make bench`: DBOS is no dependency of ours.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

TURN = {"role": "assistant", "text": "t" * 1900, "stop": "tool_use", "usage": {"in": 1200, "out": 300}}
TOOL = {"call_id": "c", "status": "ok", "output": "o" * 950}
Item = tuple[str, tuple[Any, ...], "asyncio.Future[None]"]


class Writer:
    """One task drains every checkpoint that arrived while the last batch committed into the next batch; a
    checkpoint's `put` returns once its row is committed."""

    def __init__(self) -> None:
        self.q: asyncio.Queue[Item] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None

    async def submit(self, kind: str, payload: tuple[Any, ...]) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.q.put_nowait((kind, payload, fut))
        await fut

    async def run(self) -> None:
        while True:
            items = [await self.q.get()]
            while not self.q.empty():
                items.append(self.q.get_nowait())
            try:
                await self.write(
                    [p for k, p, _ in items if k == "start"],
                    [p for k, p, _ in items if k == "step"],
                    [p[0] for k, p, _ in items if k == "end"],
                )
            except Exception as e:  # every waiter of the batch learns it failed
                for *_, f in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            for *_, f in items:
                if not f.done():
                    f.set_result(None)

    async def write(self, starts: list[Any], steps: list[Any], ends: list[Any]) -> None:
        raise NotImplementedError

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass


class PgWriter(Writer):
    def __init__(self, url: str) -> None:
        super().__init__()
        self.url, self.s = url, f"durable_cost_{uuid.uuid4().hex[:8]}"

    async def open(self) -> None:
        import psycopg

        self.c = await psycopg.AsyncConnection.connect(self.url, autocommit=True)  # the writer's own connection
        await self.c.execute(f"CREATE SCHEMA {self.s}")
        await self.c.execute(f"CREATE TABLE {self.s}.runs (run_id text PRIMARY KEY, owner text, state text)")
        await self.c.execute(
            f"CREATE TABLE {self.s}.steps (run_id text, step_no int, value bytea, PRIMARY KEY (run_id, step_no))"
        )

    async def close(self) -> None:
        await self.c.execute(f"DROP SCHEMA {self.s} CASCADE")
        await self.c.close()

    async def write(self, starts: list[Any], steps: list[Any], ends: list[Any]) -> None:
        s, todo = self.s, []
        if starts:
            q = (
                f"INSERT INTO {s}.runs SELECT r, o, 'running' FROM unnest(%s::text[], %s::text[]) t(r, o)"
                " ON CONFLICT DO NOTHING"
            )
            todo.append((q, ([r for r, _ in starts], [o for _, o in starts])))
        if steps:  # fenced: only while the run is still ours
            q = (
                f"INSERT INTO {s}.steps SELECT u.r, u.n, u.v"
                " FROM unnest(%s::text[], %s::int[], %s::bytea[], %s::text[]) u(r, n, v, o)"
                f" JOIN {s}.runs ON runs.run_id = u.r AND runs.owner = u.o ON CONFLICT DO NOTHING"
            )
            todo.append((q, tuple(list(col) for col in zip(*steps, strict=True))))
        if ends:
            todo.append((f"UPDATE {s}.runs SET state = 'done' WHERE run_id = ANY(%s)", (ends,)))
        if len(todo) == 1:  # the usual batch: one autocommit statement, one round trip
            await self.c.execute(*todo[0])
            return
        async with self.c.pipeline(), self.c.transaction():
            for q, a in todo:
                await self.c.execute(q, a)


class SqliteWriter(Writer):
    """sqlite3 on one thread of its own; WAL with synchronous=NORMAL survives kill -9 of the process."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, owner TEXT, state TEXT)")
        self.db.execute(
            "CREATE TABLE steps (run_id TEXT, step_no INT, value BLOB, PRIMARY KEY (run_id, step_no)) WITHOUT ROWID"
        )

    async def close(self) -> None:
        self.db.close()

    def write_sync(self, starts: list[Any], steps: list[Any], ends: list[Any]) -> None:
        with self.db:
            self.db.execute("BEGIN")
            self.db.executemany("INSERT OR IGNORE INTO runs VALUES (?, ?, 'running')", starts)
            self.db.executemany("INSERT OR IGNORE INTO steps VALUES (?, ?, ?)", [p[:3] for p in steps])
            self.db.executemany("UPDATE runs SET state = 'done' WHERE run_id = ?", [(e,) for e in ends])

    async def write(self, starts: list[Any], steps: list[Any], ends: list[Any]) -> None:
        await asyncio.to_thread(self.write_sync, starts, steps, ends)


async def body(i: int) -> dict[str, Any]:
    await asyncio.sleep(0)
    return dict(TURN if i % 3 != 1 else TOOL, i=i)


def dbos_runner(kind: list[str], pg: str, tmp: str, wall: list[float]) -> Any:
    import sqlalchemy as sa
    from dbos import DBOS, SetWorkflowID
    from dbos._serialization import DBOSPortableJSON

    url = pg if kind[1] == "pg" else f"sqlite:///{tmp}/dbos.sqlite"
    cfg: dict[str, Any] = {"name": "durable-cost", "system_database_url": url, "application_version": "durable-cost"}
    cfg.update(executor_id="dc-" + uuid.uuid4().hex[:8], log_level="WARNING")
    if "json" in kind:
        cfg["serializer"] = DBOSPortableJSON
    if "t8" in kind:
        cfg.update(max_executor_threads=8, sys_db_pool_size=8)
    if "wal" in kind:
        eng = sa.create_engine(url, pool_size=20, max_overflow=0)

        @sa.event.listens_for(eng, "connect")
        def _pragmas(conn: Any, _: Any) -> None:
            conn.isolation_level = "IMMEDIATE"
            for p in ("journal_mode=WAL", "synchronous=NORMAL", "busy_timeout=30000", "foreign_keys=ON"):
                conn.execute(f"PRAGMA {p}")

        cfg["system_database_engine"] = eng
    DBOS(config=cfg)  # type: ignore[arg-type]

    @DBOS.step(name="step")
    async def step(i: int) -> dict[str, Any]:
        return await body(i)

    @DBOS.workflow(name="run")
    async def workflow(n: int) -> int:
        for i in range(n):
            t = time.perf_counter()
            await step(i)
            wall.append(time.perf_counter() - t)
        return n

    DBOS.launch()

    async def run_one(n: int) -> None:
        with SetWorkflowID(uuid.uuid4().hex):
            handle = await DBOS.start_workflow_async(workflow, n)
        await handle.get_result()

    return run_one


async def open_store(backend: str, pg: str, tmp: str) -> Any:
    """The service's own checkpoint store; on PostgreSQL in a scratch schema of `pg`."""
    from urllib.parse import quote

    if backend == "sqlite":
        from service.durable.sqlite import SqliteCheckpointStore

        store: Any = SqliteCheckpointStore(Path(tmp) / "durable.db", "bench")
    else:
        import psycopg

        from service.durable.postgres import PgCheckpointStore

        schema = f"durable_cost_{uuid.uuid4().hex[:8]}"
        async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
            await conn.execute(f"CREATE SCHEMA {schema}")
        sep = "&" if "?" in pg else "?"
        store = PgCheckpointStore(f"{pg}{sep}options={quote(f'-csearch_path={schema}')}", "bench")
        store.schema = schema
    await store.open()
    return store


def open_runlog(tmp: str) -> Any:
    from service.state.sqlite_runs import SqliteRunLog

    return SqliteRunLog(Path(tmp) / "runs.db", retention_s=900, max_run_s=3600)


async def close_store(store: Any, runlog: Any, pg: str | None) -> None:
    if runlog is not None:
        await runlog.close()
    await store.aclose()
    if pg is not None:
        await drop_schema(pg, store.schema)


async def drop_schema(pg: str, schema: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(pg, autocommit=True) as conn:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")


def store_runner(store: Any, wall: list[float], runlog: Any = None, events: int = 0) -> Any:
    """Runs of `n` checkpoints; with `events`, each step first logs that many text deltas in the run's log (in
    memory, and with `runlog` on disk too, flushed before the checkpoint)."""
    from service.control import RunControl
    from service.durable.base import DurableRun, Step
    from service.events import TextDelta
    from service.run import Run
    from service.spec import RunSpec

    async def run_one(n: int) -> None:
        rid = uuid.uuid4().hex
        spec = RunSpec(run_id=rid, message="m", model="x", system=None, max_turns=n, max_tokens=1, tools=())
        if runlog is None:
            run = Run(spec, RunControl(), caller="bench", key="", fingerprint="")
        else:
            run = runlog.new_run(spec, RunControl(), caller="bench", key="", fingerprint="")
        await store.begin(DurableRun(run_id=rid, caller="bench", owner="", state="running", request={"n": n}))
        for i in range(n):
            t = time.perf_counter()
            value = await body(i)
            for _ in range(events):
                run.append(TextDelta(turn=i, text="a few words "))
            seq = len(run.log)
            if runlog is not None and runlog._joined is None:
                await runlog.flush(run)
            await store.put(Step(run_id=rid, step_no=i + 1, kind="turn", key=f"turn:{i}", value=value, seq=seq))
            wall.append(time.perf_counter() - t)
        await store.end(rid, "completed")

    return run_one


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return 1000 * xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else float("nan")


async def main(a: argparse.Namespace) -> None:
    kind, wall, lags = a.config.split(":"), [], []
    tmp = tempfile.mkdtemp(prefix="durable-cost-")
    writer: Writer | None = None
    store: Any = None
    runlog: Any = None
    if kind[0] == "dbos":
        run_one = dbos_runner(kind, a.pg, tmp, wall)
    elif kind[0] == "store":
        store = await open_store(kind[1], a.pg, tmp)
        runlog = open_runlog(tmp) if "log" in kind else None
        if runlog is not None and "joined" in kind:
            runlog.join(store)
        run_one = store_runner(store, wall, runlog, a.events)
    else:
        if kind[0] == "ours":
            writer = PgWriter(a.pg) if kind[1] == "pg" else SqliteWriter(os.path.join(tmp, "ours.sqlite"))
            await writer.open()
            writer.task = asyncio.create_task(writer.run())

        async def run_one(n: int) -> None:
            rid = uuid.uuid4().hex
            if writer:
                await writer.submit("start", (rid, "me"))
            for i in range(n):
                t = time.perf_counter()
                value = json.dumps(await body(i)).encode()
                if writer:
                    await writer.submit("step", (rid, i, value, "me"))
                wall.append(time.perf_counter() - t)
            if writer:
                await writer.submit("end", (rid,))

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while True:
            t = loop.time()
            await asyncio.sleep(0.005)
            lags.append(loop.time() - t - 0.005)

    await run_one(3)  # warm-up
    wall.clear()
    tick = asyncio.create_task(ticker())
    cpu, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(run_one(a.s) for _ in range(a.w)))
    cpu, elapsed, n = time.process_time() - cpu, time.perf_counter() - t0, a.w * a.s
    tick.cancel()
    out = {"config": a.config, "w": a.w, "s": a.s, "events": a.events, "cpu_ms_per_checkpoint": 1000 * cpu / n}
    out.update(checkpoints_per_s=n / elapsed, wall_p50_ms=pct(wall, 50), wall_p99_ms=pct(wall, 99))
    out.update(loop_lag_p99_ms=pct(lags, 99), loadavg_1m=os.getloadavg()[0])
    print(json.dumps(out), flush=True)
    if store is not None:
        await close_store(store, runlog, a.pg if kind[1] == "pg" else None)
    if writer:
        if writer.task:
            writer.task.cancel()
        await writer.close()
    shutil.rmtree(tmp, ignore_errors=True)
    os._exit(0)  # DBOS's threads would keep the process alive


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config")
    p.add_argument("--w", type=int, default=100, help="runs in flight")
    p.add_argument("--s", type=int, default=20, help="checkpoints per run")
    p.add_argument("--events", type=int, default=0, help="events a step logs before its checkpoint (store:…)")
    p.add_argument("--pg", default=os.environ.get("AGENT_RECORDS_URL", "postgresql://127.0.0.1:5432/test"))
    asyncio.run(main(p.parse_args()))
