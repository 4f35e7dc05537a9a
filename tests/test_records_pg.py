"""Records on the real PostgreSQL (records.url): versioned migrations, one audit chain for two writers that `verify`
accepts (and tampering it found), dead letters from two writers and the CLI, run summaries, and a service whose
tool calls land there."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from backends import PostgresSchema

from conftest import run_events
from fake_tools import policy_tools
from service import events as ev
from service.records import audit, deadletter
from service.records.audit import AuditRecord
from service.records.audit_chain import Keyring, parse_keys
from service.records.deadletter import DeadLetter, capture, new_execution_id
from service.records.pg_audit import PgAuditLog, verify_pg
from service.records.pg_deadletter import PgDeadLetterStore, readers
from service.records.pg_summaries import PgRunSummaryStore
from service.records.postgres import MIGRATIONS, PgRecords, migrate
from service.records.summaries import RunSummary, SqliteRunSummaryStore

KEYS = "k1:" + "a" * 40


@pytest.fixture
def keyring() -> Keyring:
    return parse_keys(KEYS, "test")


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "keys"
    path.write_text(KEYS + "\n")
    path.chmod(0o600)
    return path


def record(i: int, writer: str = "a") -> AuditRecord:
    return AuditRecord(
        ts=time.time(),
        run_id=f"run_{writer}{i}",
        metadata={"caller": writer},
        tool="echo",
        call_id=f"c{i}",
        input={"text": str(i)},
        status="ok",
        duration_s=0.001 * i,
        attempts=1,
        cache_hit=False,
        answered_by="",
        data={"echo": str(i)},
        trace_id=f"{i:032x}",
    )


def letter(tool: str, run_id: str) -> dict[str, Any]:
    return {
        "run_id": run_id,
        "call_id": "c1",
        "tool": tool,
        "input": {"text": "boom\x00"},
        "status": "error",
        "error_type": "ToolError",
        "message": "upstream 503",
        "traceback": "Traceback …",
        "attempts": 2,
        "trace_id": "ab" * 16,
    }


@pytest.fixture
async def replicas(postgres_schema: PostgresSchema, tmp_path: Path) -> AsyncIterator[Any]:
    """`make(name)`: a replica's records database (its own pool and spool) on the test's schema; closed after."""
    made: list[PgRecords] = []

    def make(name: str, url: str | None = None, **kw: Any) -> PgRecords:
        db = PgRecords(url or postgres_schema.url, spool_path=tmp_path / name / "records-spool.db", **kw)
        made.append(db)
        return db

    yield make
    for db in made:
        if not db._closed:
            db._users = 1
            await db.release()


def sql(pg: PostgresSchema, query: str, params: Any = None) -> list[Any]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        cursor = conn.execute(query, params)
        return cursor.fetchall() if cursor.description else []


async def test_a_fresh_schema_migrates_once_and_concurrent_starts_do_not_race(postgres_schema: PostgresSchema) -> None:
    async def start() -> list[int]:
        async with await psycopg.AsyncConnection.connect(postgres_schema.url, autocommit=True) as conn:
            return await migrate(conn)

    applied = await asyncio.gather(*(start() for _ in range(4)))  # four replicas starting at once
    assert sorted(applied, key=len) == [[], [], [], [m.version for m in MIGRATIONS]]
    assert await start() == []  # a later start: nothing to do
    versions = sql(postgres_schema, "SELECT version FROM schema_migrations ORDER BY version")
    assert [v for (v,) in versions] == [m.version for m in MIGRATIONS]


async def test_two_writers_make_one_chain_that_verify_accepts(
    replicas: Any, keyring: Keyring, key_file: Path, postgres_schema: PostgresSchema, capsys: Any
) -> None:
    logs, dbs = [], []
    for name in ("a", "b"):
        db = replicas(name)
        await db.open()
        dbs.append(db)
        logs.append(PgAuditLog(db, keyring=keyring, interval_s=0.001))

    async def write(log: PgAuditLog, writer: str) -> None:
        for i in range(150):
            log.append(record(i, writer))
            if i % 10 == 0:
                await asyncio.sleep(0)  # let the other writer's batches in between
        await log.flush()

    await asyncio.gather(write(logs[0], "a"), write(logs[1], "b"))
    assert [db.up for db in dbs] == [True, True] and [db.pending for db in dbs] == [0, 0]  # no batch failed
    for log in logs:
        await log.aclose()
    verdict = verify_pg(postgres_schema.url, keyring)
    assert verdict.ok and verdict.rows == 300, verdict.problem
    writers = sql(postgres_schema, "SELECT substr(run_id, 5, 1), count(*) FROM audit GROUP BY 1 ORDER BY 1")
    assert writers == [("a", 150), ("b", 150)]
    # interleaved: the two writers' batches alternate in the one chain
    order = [w for (w,) in sql(postgres_schema, "SELECT substr(run_id, 5, 1) FROM audit ORDER BY seq")]
    assert sum(1 for x, y in zip(order, order[1:], strict=False) if x != y) >= 1
    assert sql(postgres_schema, "SELECT trace_id FROM audit WHERE run_id = 'run_a7'") == [(f"{7:032x}",)]

    assert audit.main(["verify", "--url", postgres_schema.url, "--key-file", str(key_file)]) == 0
    assert "300 row(s), hash chain intact" in capsys.readouterr().out
    assert audit.main(["head", "--url", postgres_schema.url]) == 0
    assert json.loads(capsys.readouterr().out)["seq"] == 300
    assert audit.main(["tail", "-n", "2", "--url", postgres_schema.url]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("UPDATE audit SET status = 'error' WHERE seq = 3", "row 3: wrong MAC"),
        ("UPDATE audit SET trace_id = 'f' || substr(trace_id, 2) WHERE seq = 2", "row 2: wrong MAC"),
        ("DELETE FROM audit WHERE seq = 3", "row 3 is missing"),
        ("DELETE FROM audit WHERE seq = 5", "rows after 4 are missing"),
    ],
)
async def test_verify_names_a_tampered_row(
    replicas: Any, keyring: Keyring, key_file: Path, postgres_schema: PostgresSchema, tamper: str, problem: str
) -> None:
    db = replicas("a")
    await db.open()
    log = PgAuditLog(db, keyring=keyring)
    for i in range(5):
        log.append(record(i))
    await log.aclose()
    assert verify_pg(postgres_schema.url, keyring).ok
    sql(postgres_schema, tamper)
    verdict = verify_pg(postgres_schema.url, keyring)
    assert not verdict.ok and problem in verdict.problem
    assert audit.main(["verify", "--url", postgres_schema.url, "--key-file", str(key_file)]) == 1


async def test_dead_letters_from_two_writers_are_listed_and_shown(
    replicas: Any, postgres_schema: PostgresSchema, capsys: Any
) -> None:
    stores = []
    for name in ("a", "b"):
        db = replicas(name)
        await db.open()
        stores.append(PgDeadLetterStore(db))
    written = await asyncio.gather(
        capture(stores[0], **letter("flaky", "run_a")), capture(stores[1], **letter("other", "run_b"))
    )
    assert all(w is not None for w in written)
    again = dataclasses.replace(written[0], message="a second copy")  # type: ignore[type-var]
    await stores[0].add(again)  # sent twice (a lost COMMIT answer): kept once, as first written
    for store in stores:
        await store.aclose()

    recent, get = readers(postgres_schema.url)
    assert {x.run_id for x in recent()} == {"run_a", "run_b"}
    assert [x.tool for x in recent(tool="other")] == ["other"]
    first = get(written[0].execution_id)  # type: ignore[union-attr]
    assert first is not None and first.message == "upstream 503" and first.input == {"text": "boom\x00"}
    assert first.trace_id == "ab" * 16

    assert deadletter.main(["list", "--url", postgres_schema.url]) == 0
    listed = capsys.readouterr().out
    assert "flaky  error  attempts=2" in listed and "run=run_b" in listed
    assert deadletter.main(["show", written[1].execution_id, "--url", postgres_schema.url]) == 0  # type: ignore[union-attr]
    assert json.loads(capsys.readouterr().out)["tool"] == "other"
    assert deadletter.main(["show", "exec_nope", "--url", postgres_schema.url]) == 1


async def test_dead_letters_past_retention_are_deleted(replicas: Any, postgres_schema: PostgresSchema) -> None:
    now = [1_000_000.0]
    db = replicas("a")
    await db.open()
    store = PgDeadLetterStore(db, retention_s=86400, clock=lambda: now[0])
    old = DeadLetter(execution_id=new_execution_id(), created_at=now[0] - 2 * 86400, **letter("flaky", "r_old"))
    new = DeadLetter(execution_id=new_execution_id(), created_at=now[0], **letter("flaky", "r_new"))
    await store.add(old)  # the first add purges: the old letter was not in yet
    await store.add(new)
    now[0] += 3600  # an hour on: the next add purges
    await store.add(dataclasses.replace(new, execution_id=new_execution_id()))
    await store.aclose()
    assert sorted(r for (r,) in sql(postgres_schema, "SELECT run_id FROM dead_letters")) == ["r_new", "r_new"]


def summary(run_id: str, **kw: Any) -> RunSummary:
    values: dict[str, Any] = {
        "run_id": run_id,
        "caller": "billing",
        "state": "succeeded",
        "last_seq": 12,
        "created_ns": 1,
        "ended_ns": 2,
        "outcome": ev.FinalResponse(
            text="done", stop_reason="end_turn", turns=2, tool_calls=1, input_tokens=3, output_tokens=4, duration_s=0.5
        ),
        "trace_id": "cd" * 16,
    }
    return RunSummary(**{**values, **kw})


async def test_run_summaries_put_is_idempotent(replicas: Any, tmp_path: Path) -> None:
    db = replicas("a")
    await db.open()
    pg = PgRunSummaryStore(db)
    owner = PgDeadLetterStore(db)  # the owner that closes the database
    lite = SqliteRunSummaryStore(tmp_path / "summaries.db")
    for store in (pg, lite):
        await store.put(summary("run_1"))
        await store.put(summary("run_1", state="failed", outcome=None))  # a handed-over run ending twice
        failed = ev.RunFailed(code="UNAVAILABLE", message="model down", retryable=True)
        await store.put(summary("run_2", state="failed", outcome=failed))
        assert await store.get("run_1") == summary("run_1")
        got = await store.get("run_2")
        assert got is not None and got.outcome == failed
        assert await store.get("run_nope") is None
        await store.aclose()
    await owner.aclose()


FAIL_THEN_ANSWER = [
    {"text": "Calling flaky.", "tool_calls": [{"name": "flaky", "input": {"text": "boom"}}]},
    {"text": "The answer: {results}"},
]


async def test_a_service_on_postgresql_records_its_calls_there(
    start_service: Any, channel_to: Any, postgres_schema: PostgresSchema, key_file: Path, keyring: Keyring
) -> None:
    overrides = {"flaky": {"retry": {"attempts": 2, "initial_backoff_s": 0.001}}}
    svc = await start_service(
        FAIL_THEN_ANSWER,
        tools=policy_tools(failures=99),
        policies=overrides,
        records={"url": postgres_schema.url},
        audit={"key_file": key_file},
    )
    events = await run_events(channel_to(svc), metadata={"caller": "billing"})
    failed = [e.execution_failed for e in events if e.HasField("execution_failed")]
    assert len(failed) == 1
    await svc.server.stop(0)
    await svc.close()  # flushes the audit log

    rows = sql(postgres_schema, "SELECT run_id, tool, status, attempts FROM audit ORDER BY seq")
    assert rows == [(events[0].run_id, "flaky", "error", 2)]
    letters = sql(postgres_schema, "SELECT execution_id, run_id FROM dead_letters")
    assert letters == [(failed[0].execution_id, events[0].run_id)]
    assert verify_pg(postgres_schema.url, keyring).ok
    assert not (svc.config.data_dir / "audit.db").exists()  # nothing went to the SQLite file
    assert not (svc.config.data_dir / "audit.key").exists()  # nor was a key of this replica's own made


async def test_text_postgresql_refuses_does_not_lose_the_batch(
    replicas: Any, keyring: Keyring, postgres_schema: PostgresSchema
) -> None:
    """A NUL (which PostgreSQL's text refuses and SQLite keeps) or half an emoji in a tool name the model made up:
    the row is kept with U+FFFD in their place, and the rest of its batch with it."""
    db = replicas("a")
    await db.open()
    log = PgAuditLog(db, keyring=keyring)
    log.append(record(1))
    log.append(dataclasses.replace(record(2), tool="ec\x00ho\ud83d", status="rejected", error="unknown \x00"))
    log.append(record(3))
    await log.aclose()
    assert db.pending == 0
    assert sql(postgres_schema, "SELECT tool FROM audit WHERE seq = 2") == [("ec\ufffdho\ufffd",)]
    verdict = verify_pg(postgres_schema.url, keyring)
    assert verdict.ok and verdict.rows == 3
