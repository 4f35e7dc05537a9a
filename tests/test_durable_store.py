"""The checkpoint stores on a real SQLite file and the real PostgreSQL: round trip, idempotent puts, one commit per
batch, the fence (a write after another owner claimed the run is refused), recovery of a `kill -9`ed process's runs
(by a restart with its id, or by a live peer through its advisory lock), and a drain's hand-over."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from service.durable.base import CheckpointStore, DurableRun, Step, TakenOver
from service.durable.executor_id import executor_id
from service.durable.postgres import PgCheckpointStore
from service.durable.sqlite import ExecutorIdInUse, SqliteCheckpointStore

HOLDER = Path(__file__).parent / "programs" / "durable_holder.py"
ROOT = Path(__file__).parent.parent


@dataclass
class Backend:
    name: str
    make: Callable[..., Any]  # (owner, **options) -> store, not yet open


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "postgres":
        url = request.getfixturevalue("postgres_schema").url
        return Backend("postgres", lambda owner, **kw: PgCheckpointStore(url, owner, **kw))
    path = tmp_path / "durable.db"
    return Backend("sqlite", lambda owner, **kw: SqliteCheckpointStore(path, owner, **kw))


def run(run_id: str, **kw: Any) -> DurableRun:
    return DurableRun(run_id=run_id, caller="alice", owner="", state="running", request={"prompt": run_id}, **kw)


def step(run_id: str, n: int, value: Any = None, kind: Any = "turn") -> Step:
    return Step(run_id=run_id, step_no=n, kind=kind, key=f"{kind}:{n}", value={"v": value or n}, seq=10 * n)


class Resumed:
    """A `resume` that collects what `recover` hands over."""

    def __init__(self) -> None:
        self.runs: asyncio.Queue[DurableRun] = asyncio.Queue()

    async def __call__(self, run: DurableRun) -> None:
        self.runs.put_nowait(run)

    async def take(self, n: int, within: float = 10.0) -> list[DurableRun]:
        async with asyncio.timeout(within):
            return [await self.runs.get() for _ in range(n)]


async def recovering(store: CheckpointStore, resumed: Resumed) -> asyncio.Task[None]:
    return asyncio.get_running_loop().create_task(store.recover(resumed))


async def stop(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_begin_put_load_round_trip(backend: Backend, opened: Any) -> None:
    store = await opened(backend.make("a"))
    await store.begin(run("r1", background=True))
    await store.put(step("r1", 1))
    await store.put(Step(run_id="r1", step_no=2, kind="intent", key="call:c1", value={"input": {"x": "é"}}, seq=21))
    await store.put(step("r1", 3, kind="tool"))
    loaded = await store.load("r1")
    assert loaded is not None
    assert (loaded.owner, loaded.state, loaded.caller, loaded.background) == ("a", "running", "alice", True)
    assert loaded.request == {"prompt": "r1"}
    assert [(s.step_no, s.kind, s.key, s.seq, s.value) for s in loaded.steps] == [
        (1, "turn", "turn:1", 10, {"v": 1}),
        (2, "intent", "call:c1", 21, {"input": {"x": "é"}}),
        (3, "tool", "tool:3", 30, {"v": 3}),
    ]
    await store.end("r1", "completed")
    ended = await store.load("r1")
    assert ended is not None and ended.state == "completed"
    assert await store.load("nope") is None


async def test_put_is_idempotent_and_begin_never_replaces(backend: Backend, opened: Any) -> None:
    store = await opened(backend.make("a"))
    await store.begin(run("r1"))
    await store.begin(DurableRun(run_id="r1", caller="bob", owner="", state="running", request={}))
    await store.put(step("r1", 1, "first"))
    await store.put(step("r1", 1, "first"))  # a replayed step, or a batch sent again
    await store.put(step("r1", 1, "second"))
    loaded = await store.load("r1")
    assert loaded is not None and loaded.caller == "alice"
    assert [s.value for s in loaded.steps] == [{"v": "first"}]


async def test_concurrent_puts_commit_in_one_batch(backend: Backend, opened: Any) -> None:
    store = await opened(backend.make("a"))
    commits: list[str] = []
    if isinstance(store, SqliteCheckpointStore):  # count what SQLite itself commits, not only the store's counter
        db = store._db
        assert db is not None
        db.set_trace_callback(lambda statement: commits.append(statement) if statement == "COMMIT" else None)
    ids = [f"r{i}" for i in range(100)]
    await asyncio.gather(*(store.begin(run(r)) for r in ids))
    before, commits_before = store.batches, len(commits)
    await asyncio.gather(*(store.put(step(r, 1)) for r in ids))
    assert store.batches - before == 1  # all 100 were queued before the writer woke
    if isinstance(store, SqliteCheckpointStore):
        assert len(commits) - commits_before == 1
    for r in ids[::17]:
        loaded = await store.load(r)
        assert loaded is not None and [s.step_no for s in loaded.steps] == [1]


async def test_a_mixed_batch_gives_each_write_its_own_verdict(backend: Backend, opened: Any) -> None:
    a = await opened(backend.make("a"))
    b = await opened(backend.make("b"))
    await b.begin(run("theirs"))
    await a.begin(run("r1"))
    await a.begin(run("r2"))
    before = a.batches
    results = await asyncio.gather(
        a.begin(run("r3")),
        a.put(step("r1", 1)),
        a.end("r2", "completed"),
        a.put(step("theirs", 1)),
        a.end("theirs", "failed"),
        a.release("theirs"),
        return_exceptions=True,
    )
    assert a.batches - before == 1  # one transaction
    assert [type(r).__name__ for r in results] == ["NoneType"] * 3 + ["TakenOver"] * 2 + ["NoneType"]
    r1, r2, r3, theirs = [await a.load(r) for r in ("r1", "r2", "r3", "theirs")]
    assert r1 is not None and [s.step_no for s in r1.steps] == [1]
    assert r2 is not None and r2.state == "completed"
    assert r3 is not None and r3.owner == "a"
    assert theirs is not None and (theirs.owner, theirs.state, theirs.steps) == ("b", "running", [])


async def test_recover_outlives_a_lost_connection(postgres_schema: Any, opened: Any) -> None:
    a = await opened(PgCheckpointStore(postgres_schema.url, "a"))
    b = await opened(PgCheckpointStore(postgres_schema.url, "b", recover_interval_s=0.05))
    await a.begin(run("r1"))
    resumed = Resumed()
    task = await recovering(b, resumed)
    try:
        async with await PgCheckpointStore._connect(a) as admin:
            assert b._control is not None
            await admin.execute("SELECT pg_terminate_backend(%s)", (b._control.info.backend_pid,))
        await a.release("r1")
        [claimed] = await resumed.take(1)
    finally:
        await stop(task)
    assert claimed.owner == "b"


async def test_release_hands_the_run_to_a_peer_at_once(postgres_schema: Any, opened: Any) -> None:
    # a poll interval far longer than the wait: only the NOTIFY of the release can wake the peer in time
    a = await opened(PgCheckpointStore(postgres_schema.url, "a", recover_interval_s=60))
    b = await opened(PgCheckpointStore(postgres_schema.url, "b", recover_interval_s=60))
    await a.begin(run("r1"))
    await a.put(step("r1", 1))
    resumed = Resumed()
    task = await recovering(b, resumed)
    try:
        async with asyncio.timeout(10):
            await b.listening.wait()
        started = time.perf_counter()
        await a.release("r1")
        [claimed] = await resumed.take(1, within=5)
        took = time.perf_counter() - started
    finally:
        await stop(task)
    assert claimed.owner == "b" and [s.step_no for s in claimed.steps] == [1]
    assert took < 5
    with pytest.raises(TakenOver):  # the drained process can no longer write to it
        await a.put(step("r1", 2))
    await b.put(step("r1", 2))


async def test_a_write_after_another_owner_claimed_is_refused(backend: Backend, opened: Any) -> None:
    a = await opened(backend.make("a"))
    b = await opened(backend.make("b", recover_interval_s=0.05))
    await a.begin(run("r1"))
    await a.begin(run("r2"))
    await a.put(step("r1", 1))
    if isinstance(a, PgCheckpointStore):
        # a thought dead: its session (and advisory lock) ends while the process, and its writer, live on
        async with await PgCheckpointStore._connect(a) as admin:
            assert a._control is not None
            await admin.execute("SELECT pg_terminate_backend(%s)", (a._control.info.backend_pid,))
        expected = 2
    else:
        await a.release("r1")  # one node: a run changes owner only when handed over
        expected = 1
    resumed = Resumed()
    task = await recovering(b, resumed)
    try:
        claimed = await resumed.take(expected)
    finally:
        await stop(task)
    assert {r.run_id for r in claimed} == {"r1", "r2"} if expected == 2 else {"r1"}
    with pytest.raises(TakenOver):
        await a.put(step("r1", 2, "late"))
    with pytest.raises(TakenOver):
        await a.end("r1", "completed")
    await b.put(step("r1", 2, "new owner"))
    loaded = await b.load("r1")
    assert loaded is not None and loaded.owner == "b" and loaded.state == "running"
    assert [s.value for s in loaded.steps] == [{"v": 1}, {"v": "new owner"}]


async def test_no_acknowledged_step_is_lost_to_a_claim_racing_it(postgres_schema: Any, opened: Any) -> None:
    """Writes in flight while a peer claims: each either commits before the claim (and the claimer loads it) or is
    refused; never acknowledged and then missing from what the new owner continues from."""
    a = await opened(PgCheckpointStore(postgres_schema.url, "a"))
    b = await opened(PgCheckpointStore(postgres_schema.url, "b", recover_interval_s=0.01))
    ids = [f"r{i}" for i in range(20)]
    await asyncio.gather(*(a.begin(run(r)) for r in ids))
    acked: dict[str, int] = dict.fromkeys(ids, 0)
    writing = asyncio.Event()

    async def write(run_id: str) -> None:
        for n in range(1, 10_000):
            try:
                await a.put(step(run_id, n))
            except TakenOver:
                return
            acked[run_id] = n
            if min(acked.values()) >= 3:
                writing.set()

    writers = [asyncio.get_running_loop().create_task(write(r)) for r in ids]
    async with asyncio.timeout(10):
        await writing.wait()  # every run is writing
    async with await PgCheckpointStore._connect(a) as admin:
        assert a._control is not None
        await admin.execute("SELECT pg_terminate_backend(%s)", (a._control.info.backend_pid,))
    resumed = Resumed()
    task = await recovering(b, resumed)
    try:
        claimed = await resumed.take(len(ids))
        async with asyncio.timeout(10):
            await asyncio.gather(*writers)
    finally:
        await stop(task)
    for r in claimed:
        assert [s.step_no for s in r.steps] == list(range(1, len(r.steps) + 1))
        assert len(r.steps) >= acked[r.run_id]  # nothing acknowledged is missing
        assert len(r.steps) <= acked[r.run_id] + 1  # at most the one in flight at the claim, never acknowledged


async def test_a_claim_waits_for_a_write_in_flight(postgres_schema: Any, opened: Any) -> None:
    """The window the fence's share lock closes, held open: a's write of step 2 waits (on another transaction
    inserting the same key) after it found the run its own; b claims meanwhile. b must not load the run before that
    write commits, or b would continue without a step a was told is recorded."""
    a = await opened(PgCheckpointStore(postgres_schema.url, "a"))
    b = await opened(PgCheckpointStore(postgres_schema.url, "b", recover_interval_s=0.01))
    await a.begin(run("r1"))
    await a.put(step("r1", 1))
    async with await PgCheckpointStore._connect(a) as admin, await PgCheckpointStore._connect(a) as blocker:
        assert a._writer_conn is not None and a._control is not None and b._control is not None
        await blocker.execute("BEGIN")
        await blocker.execute(
            "INSERT INTO run_steps (run_id, step_no, kind, key, seq, value) VALUES ('r1', 2, 'turn', 'x', 0, '{}')"
        )
        put = asyncio.get_running_loop().create_task(a.put(step("r1", 2, "from a")))
        writer_pid, claimer_pid = a._writer_conn.info.backend_pid, b._control.info.backend_pid

        async def waiting(pid: int) -> bool:
            query = "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s"
            return bool((await (await admin.execute(query, (pid,))).fetchone() or (False,))[0])

        await until_async(lambda: waiting(writer_pid))
        await admin.execute("SELECT pg_terminate_backend(%s)", (a._control.info.backend_pid,))  # a is "dead"
        resumed = Resumed()
        task = await recovering(b, resumed)
        try:
            await until_async(lambda: waiting_or_claimed(waiting(claimer_pid), resumed))
            await blocker.execute("ROLLBACK")
            try:
                await put
                acked = True
            except TakenOver:
                acked = False
            [claimed] = await resumed.take(1)
        finally:
            await stop(task)
    values = [s.value for s in claimed.steps]
    assert values == ([{"v": 1}, {"v": "from a"}] if acked else [{"v": 1}])


async def waiting_or_claimed(waiting: Any, resumed: Resumed) -> bool:
    return not resumed.runs.empty() or await waiting


async def until_async(condition: Callable[[], Any], within: float = 10.0) -> None:
    """Until `condition()` (a state of the database, which nothing here can wait on) is true."""
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.005)


async def test_a_restart_with_the_same_id_recovers_its_running_runs(backend: Backend, opened: Any) -> None:
    first = backend.make("node-1")
    await first.open()
    for r in ("r1", "r2", "r3"):
        await first.begin(run(r))
        await first.put(step(r, 1))
    await first.end("r2", "completed")
    await first.aclose()  # as a crash would leave it: no release

    again = await opened(backend.make("node-1"))
    await again.begin(run("r4"))  # begun by this process: never handed to its own recover
    resumed = Resumed()
    task = await recovering(again, resumed)
    try:
        runs = await resumed.take(2)
    finally:
        await stop(task)
    assert sorted(r.run_id for r in runs) == ["r1", "r3"]
    assert resumed.runs.empty()
    assert all(r.owner == "node-1" and [s.step_no for s in r.steps] == [1] for r in runs)
    await again.put(step("r1", 2))


async def test_a_live_executor_id_cannot_be_opened_twice(backend: Backend, opened: Any) -> None:
    await opened(backend.make("a"))
    second = backend.make("a", **({"timeout_s": 0.2} if backend.name == "postgres" else {}))
    with pytest.raises((ExecutorIdInUse, RuntimeError)):
        await second.open()
    await second.aclose()


async def hold(*args: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start tests/programs/durable_holder.py; its run ids once it has committed them."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(HOLDER), *args, stdout=asyncio.subprocess.PIPE, env=env
    )
    assert proc.stdout is not None
    async with asyncio.timeout(60):
        ids = (await proc.stdout.readline()).decode().split()
        assert (await proc.stdout.readline()).strip() == b"ready", "the holder did not start"
    return proc, ids


async def test_kill_9_a_peer_claims_its_runs_and_refuses_its_late_writes(postgres_schema: Any, opened: Any) -> None:
    peer = await opened(PgCheckpointStore(postgres_schema.url, "peer", recover_interval_s=0.1))
    resumed = Resumed()
    task = await recovering(peer, resumed)
    try:
        proc, ids = await hold("pg", postgres_schema.url, "victim", "20")
        assert resumed.runs.empty()  # alive: its lock is held, its runs are left alone
        killed = time.perf_counter()
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        runs = await resumed.take(len(ids), within=10)
        took = time.perf_counter() - killed
    finally:
        await stop(task)
    print(f"kill -9 -> 20 runs claimed by a peer: {took * 1000:.0f} ms")
    assert took < 5  # the bound; 0.1 s polls plus the server noticing the closed session
    assert sorted(r.run_id for r in runs) == sorted(ids)
    assert all(r.owner == "peer" and [s.value for s in r.steps] == [{"text": r.run_id}] for r in runs)
    # the dead one, back with its id: its runs are not its own any more, and a late write of it is refused
    back = await opened(PgCheckpointStore(postgres_schema.url, "victim"))
    assert back._leftovers == []
    with pytest.raises(TakenOver):
        await back.put(Step(run_id=ids[0], step_no=2, kind="tool", key="call:x", value={}, seq=7))


async def test_kill_9_one_node_restart_recovers_its_runs(tmp_path: Path, opened: Any) -> None:
    data_dir, path = tmp_path / "var", tmp_path / "var" / "durable.db"
    proc, ids = await hold("sqlite", str(path), str(data_dir), "5")
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    store = await opened(SqliteCheckpointStore(path, executor_id(data_dir)))
    resumed = Resumed()
    task = await recovering(store, resumed)
    try:
        runs = await resumed.take(len(ids))
    finally:
        await stop(task)
    assert sorted(r.run_id for r in runs) == sorted(ids)
    assert all([s.value for s in r.steps] == [{"text": r.run_id}] and r.request == {"i": r.run_id} for r in runs)
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_executor_id_is_kept_in_data_dir_and_can_be_set(tmp_path: Path) -> None:
    first = executor_id(tmp_path / "var")
    assert executor_id(tmp_path / "var") == first
    assert executor_id(tmp_path / "other") != first
    assert executor_id(tmp_path / "var", worker=2) == f"{first}-w2"
    assert executor_id(tmp_path / "var", "agent-0") == "agent-0"
    with pytest.raises(ValueError):
        executor_id(tmp_path / "var", "has space")


def _after(start: threading.Barrier, call: Callable[[Path], str]) -> Callable[[Path], str]:
    def together(data_dir: Path) -> str:
        start.wait()
        return call(data_dir)

    return together


def test_workers_starting_together_on_a_new_data_dir_share_one_whole_id(tmp_path: Path) -> None:
    # --workers N starts N processes at once on one data_dir: none may read the kept id before it is written whole
    # (an O_EXCL create then write once showed a peer the empty file, and that worker refused to start).
    for attempt in range(40):
        data_dir = tmp_path / f"var{attempt}"
        start = threading.Barrier(8)
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(_after(start, executor_id), [data_dir] * 8))
        assert len(set(ids)) == 1 and ids[0], ids
        assert sorted(p.name for p in data_dir.iterdir()) == ["executor_id"]  # no drafts left behind


def test_the_composition_root_picks_the_store_from_records_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_config
    from service.config import load_config
    from service.wiring import build_checkpoints

    store = build_checkpoints(make_config(tmp_path))
    assert isinstance(store, SqliteCheckpointStore) and store.path == tmp_path / "var" / "durable.db"
    assert store.owner == executor_id(tmp_path / "var")
    pg = build_checkpoints(make_config(tmp_path, records={"url": "postgresql://db/x"}), worker=1)
    assert isinstance(pg, PgCheckpointStore) and pg.owner == f"{store.owner}-w1"
    monkeypatch.setenv("AGENT_EXECUTOR_ID", "agent-2")
    monkeypatch.setenv("AGENT_DATA_DIR", str(tmp_path / "var"))
    assert build_checkpoints(load_config()).owner == "agent-2"
