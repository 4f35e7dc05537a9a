"""PostgreSQL unreachable: records wait in the local spool (on disk), nothing is lost, and they are written (audit
rows chained after what other replicas wrote meanwhile) once it answers again, by this process or the next one.
The shared server cannot be stopped: the writer reaches it through a TCP forwarder the test closes and reopens, or
points at a port where nothing listens."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path
from typing import Any

import psycopg
import pytest
from backends import PostgresSchema, audit_key_file
from test_records_pg import FAIL_THEN_ANSWER, KEYS, letter, record, summary

from conftest import run_events
from fake_tools import policy_tools
from service import telemetry
from service.errors import RecordsUnavailable
from service.records.audit_chain import Keyring, parse_keys
from service.records.deadletter import capture
from service.records.pg_audit import PgAuditLog, verify_pg
from service.records.pg_deadletter import PgDeadLetterStore
from service.records.pg_summaries import PgRunSummaryStore
from service.records.postgres import PgRecords
from service.records.spool import Spool


@pytest.fixture
def keyring() -> Keyring:
    return parse_keys(KEYS, "test")


class Forwarder:
    """127.0.0.1:<port> → PostgreSQL. `stop` refuses new connections and cuts the open ones, as a database that went
    away; `start` again listens on the same port."""

    def __init__(self) -> None:
        self.port = 0
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._pipes):
            task.cancel()
        await asyncio.gather(*self._pipes, return_exceptions=True)
        await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._pipes.add(task)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5432)
            try:
                async with asyncio.TaskGroup() as group:
                    group.create_task(_pipe(reader, up_writer))
                    group.create_task(_pipe(up_reader, writer))
            finally:
                up_writer.transport.abort()
        except (asyncio.CancelledError, OSError, ExceptionGroup):
            pass
        finally:
            writer.transport.abort()
            self._pipes.discard(task)

    def url(self, pg: PostgresSchema) -> str:
        return pg.url.replace("127.0.0.1:5432", f"127.0.0.1:{self.port}")


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.transport.abort()  # one side ended: so does the other


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rows(pg: PostgresSchema, query: str) -> list[Any]:
    with psycopg.connect(pg.url) as conn:
        return conn.execute(query).fetchall()


async def test_records_spool_while_postgresql_is_away_and_are_chained_when_it_is_back(
    postgres_schema: PostgresSchema, tmp_path: Path, keyring: Keyring
) -> None:
    proxy = Forwarder()
    await proxy.start()
    db = PgRecords(proxy.url(postgres_schema), spool_path=tmp_path / "a" / "spool.db", timeout_s=1.0, retry_s=0.05)
    other = PgRecords(postgres_schema.url, spool_path=tmp_path / "b" / "spool.db")  # another replica, never cut off
    await db.open()
    log = PgAuditLog(db, keyring=keyring, interval_s=0.001)
    dead = PgDeadLetterStore(db)
    summaries = PgRunSummaryStore(db)
    try:
        assert db.up
        for i in range(3):
            log.append(record(i, "a"))
        await log.flush()

        await proxy.stop()
        for i in range(3, 8):
            log.append(record(i, "a"))
        await asyncio.wait_for(log.flush(), 30)  # in the spool: the call goes on
        written = await capture(dead, **letter("flaky", "run_a"))
        assert written is not None  # the execution id a caller sees is on disk
        await summaries.put(summary("run_a"))
        assert not db.up and db.pending == 7
        assert telemetry.RECORDS_UP._value.get() == 0 and telemetry.RECORDS_PENDING._value.get() == 7
        with pytest.raises(RecordsUnavailable):
            await summaries.get("run_a")
        assert rows(postgres_schema, "SELECT count(*) FROM audit") == [(3,)]

        await other.open()  # meanwhile the other replica writes to the chain
        other_log = PgAuditLog(other, keyring=keyring)
        for i in range(2):
            other_log.append(record(i, "b"))
        await other_log.aclose()

        await proxy.start()
        await asyncio.wait_for(db.settle(), 60)
        assert db.up and db.pending == 0
        assert telemetry.RECORDS_PENDING._value.get() == 0
        assert await summaries.get("run_a") == summary("run_a")
    finally:
        await log.aclose()
        await dead.aclose()
        with contextlib.suppress(Exception):
            await proxy.stop()

    verdict = verify_pg(postgres_schema.url, keyring)
    assert verdict.ok and verdict.rows == 10, verdict.problem
    order = [r for (r,) in rows(postgres_schema, "SELECT run_id FROM audit ORDER BY seq")]
    assert order == [f"run_a{i}" for i in range(3)] + ["run_b0", "run_b1"] + [f"run_a{i}" for i in range(3, 8)]
    assert rows(postgres_schema, "SELECT execution_id FROM dead_letters") == [(written.execution_id,)]


async def test_a_spool_left_by_a_stopped_process_is_sent_by_the_next_start(
    postgres_schema: PostgresSchema, tmp_path: Path, keyring: Keyring
) -> None:
    spool = tmp_path / "spool.db"
    away = f"postgresql://postgres@127.0.0.1:{unused_port()}/test"
    db = PgRecords(away, spool_path=spool, timeout_s=0.5)
    await db.open()
    log = PgAuditLog(db, keyring=keyring)
    for i in range(4):
        log.append(record(i))
    await log.aclose()  # the database never answered: the records stay in the spool file
    assert Spool(spool).count() == 4

    again = PgRecords(postgres_schema.url, spool_path=spool)
    await again.open()
    log = PgAuditLog(again, keyring=keyring)
    await asyncio.wait_for(again.settle(), 30)
    await log.aclose()
    verdict = verify_pg(postgres_schema.url, keyring)
    assert verdict.ok and verdict.rows == 4


async def test_a_service_whose_postgresql_is_away_runs_on_and_spools(
    start_service: Any, channel_to: Any, postgres_schema: PostgresSchema, keyring: Keyring, tmp_path: Path
) -> None:
    overrides = {"flaky": {"retry": {"attempts": 2, "initial_backoff_s": 0.001}}}
    away = f"postgresql://postgres@127.0.0.1:{unused_port()}/test"
    svc = await start_service(
        FAIL_THEN_ANSWER,
        tools=policy_tools(failures=99),
        policies=overrides,
        records={"url": away, "timeout_s": 0.5},
        audit={"key_file": audit_key_file(tmp_path, KEYS)},
    )
    events = await run_events(channel_to(svc))
    assert events[-1].HasField("final_response")  # the run went on without its records database
    (failed,) = [e.execution_failed for e in events if e.HasField("execution_failed")]
    await svc.server.stop(0)
    await svc.close()
    spool_path = svc.config.data_dir / "records-spool.db"
    assert Spool(spool_path).count() == 3  # its audit row, its dead letter and the run's summary

    back = PgRecords(postgres_schema.url, spool_path=spool_path)
    await back.open()
    log, dead = PgAuditLog(back, keyring=keyring), PgDeadLetterStore(back)
    PgRunSummaryStore(back)
    await asyncio.wait_for(back.settle(), 30)
    await log.aclose()
    await dead.aclose()
    assert rows(postgres_schema, "SELECT run_id, tool FROM audit") == [(events[0].run_id, "flaky")]
    assert rows(postgres_schema, "SELECT execution_id FROM dead_letters") == [(failed.execution_id,)]
    assert rows(postgres_schema, "SELECT run_id, state FROM run_summaries") == [(events[0].run_id, "succeeded")]
    assert verify_pg(postgres_schema.url, keyring).ok


def test_workers_sharing_a_spool_drain_it_one_at_a_time(tmp_path: Path) -> None:
    """`--workers` on one data_dir share the spool file: entries from both are kept in order, and only one process
    holds the drain lock, so no entry is sent twice by two drainers."""
    first, second = Spool(tmp_path / "spool.db"), Spool(tmp_path / "spool.db")
    try:
        first.put("audit", [{"n": 1}])
        second.put("dead_letter", [{"n": 2}])
        assert [(e.kind, e.body) for e in first.first(10)] == [("audit", {"n": 1}), ("dead_letter", {"n": 2})]
        assert first.try_lock() and not second.try_lock()
        first.unlock()
        assert second.try_lock()
    finally:
        first.close()
        second.close()


async def _health(channel: Any, name: str) -> int:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=name))
    return int(reply.status)


async def test_health_says_when_records_spool_and_when_postgresql_is_back(
    start_service: Any, channel_to: Any, postgres_schema: PostgresSchema, tmp_path: Path
) -> None:
    """`agent.v1.RecordsStore` goes NOT_SERVING while PostgreSQL cannot be reached and SERVING once it answers again,
    on its own; the main service stays SERVING throughout (a replica whose records spool still runs)."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    serving, not_serving = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
    forwarder = Forwarder()
    await forwarder.start()
    await forwarder.stop()  # the port is known, nothing answers on it yet
    svc = await start_service(
        FAIL_THEN_ANSWER,
        records={"url": forwarder.url(postgres_schema), "timeout_s": 0.5},
        audit={"key_file": audit_key_file(tmp_path)},
    )
    channel = channel_to(svc)
    try:
        assert await _health(channel, "agent.v1.RecordsStore") == not_serving
        assert await _health(channel, "agent.v1.AgentService") == serving
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service="agent.v1.RecordsStore")
        )
        assert (await watch.read()).status == not_serving
        await forwarder.start()
        async with asyncio.timeout(30):  # the pool's reconnect back-off is capped at 8 s
            assert (await watch.read()).status == serving
        watch.cancel()
    finally:
        await svc.server.stop(0)
        await svc.close()
        await forwarder.stop()
