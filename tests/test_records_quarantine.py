"""A record the real PostgreSQL keeps refusing (a value out of range, a CHECK constraint) does not block the local
spool: after `max_refusals` refusals it moves, intact, to the spool file's quarantine (logged, counted, on health),
the records behind it land, and `python -m service.records.spool replay` sends it once the cause is fixed."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

import psycopg
import pytest
from backends import PostgresSchema, audit_key_file
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY
from test_records_pg import FAIL_THEN_ANSWER, KEYS, record
from test_records_pg_down import unused_port

from conftest import run_events
from fake_tools import policy_tools
from service.records import spool as spool_cli
from service.records.audit_chain import parse_keys
from service.records.pg_audit import PgAuditLog, verify_pg
from service.records.pg_schema import migrate
from service.records.postgres import PgRecords
from service.records.spool import Spool

SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def sql(pg: PostgresSchema, query: str) -> list[Any]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        cursor = conn.execute(query)
        return cursor.fetchall() if cursor.description else []


def quarantined_gauge() -> float | None:
    return REGISTRY.get_sample_value("agent_records_quarantined")


async def test_a_refused_record_is_quarantined_intact_and_the_records_behind_it_land(
    postgres_schema: PostgresSchema, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keyring = parse_keys(KEYS, "test")
    spool_path = tmp_path / "spool.db"
    # written while PostgreSQL was away: three audit rows in the spool, the second with a count PostgreSQL's
    # INTEGER column refuses (2^31), which no retry will change
    away = PgRecords(f"postgresql://postgres@127.0.0.1:{unused_port()}/test", spool_path=spool_path, timeout_s=0.5)
    log = PgAuditLog(away, keyring=keyring)
    for i in (1, 2, 3):
        log.append(dataclasses.replace(record(i), attempts=2**31 if i == 2 else 1))
    await log.aclose()
    spooled = Spool(spool_path)
    before = {e.body["run_id"]: (e.id, e.body) for e in spooled.first(10)}
    spooled.close()
    assert sorted(before) == ["run_a1", "run_a2", "run_a3"]

    back = PgRecords(postgres_schema.url, spool_path=spool_path, retry_s=0.01, max_refusals=3)
    told: list[int] = []
    back.on_quarantine = told.append
    log = PgAuditLog(back, keyring=keyring)
    with caplog.at_level(logging.WARNING, logger="service.records.postgres"):
        await back.open()
        await asyncio.wait_for(back.settle(), 30)  # the spool empties: the refused record no longer holds it
        log.append(record(4))  # a record after it: written at once
        await log.flush()
    await log.aclose()

    assert [r for (r,) in sql(postgres_schema, "SELECT run_id FROM audit ORDER BY seq")] == [
        "run_a1",
        "run_a3",
        "run_a4",
    ]
    assert verify_pg(postgres_schema.url, keyring).ok  # the chain is whole without it
    refusals = [r for r in caplog.records if r.getMessage().startswith("records database refused a spooled record")]
    assert [r.refusals for r in refusals] == [1, 2]  # type: ignore[attr-defined]
    (moved,) = [r for r in caplog.records if r.getMessage().startswith("record quarantined")]
    assert moved.refusals == 3 and "NumericValueOutOfRange" in moved.error  # type: ignore[attr-defined]
    assert told == [1] and back.quarantined == 1 and quarantined_gauge() == 1

    kept = Spool(spool_path)
    try:
        (entry,) = kept.quarantined()
        assert (entry["id"], json.loads(entry["body"])) == before["run_a2"]  # intact: the body as spooled
        assert entry["kind"] == "audit" and entry["refusals"] == 3 and "out of range" in entry["error"]
        assert kept.count() == 0
    finally:
        kept.close()


async def _health_watch(channel: Any, name: str) -> Any:
    return health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=name))


async def test_a_service_quarantines_a_refused_dead_letter_shows_it_on_health_and_replays_it(
    start_service: Any, channel_to: Any, postgres_schema: PostgresSchema, tmp_path: Path, capsys: Any
) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_schema.url, autocommit=True) as conn:
        await migrate(conn)
        # a constraint this service's dead letters break: PostgreSQL refuses them however often they are sent
        await conn.execute("ALTER TABLE dead_letters ADD CONSTRAINT no_flaky CHECK (tool <> 'flaky')")
    svc = await start_service(
        FAIL_THEN_ANSWER,
        tools=policy_tools(failures=2),  # the first run's two attempts fail (a dead letter), later calls succeed
        policies={"flaky": {"retry": {"attempts": 2, "initial_backoff_s": 0.001}}},
        records={"url": postgres_schema.url},
        audit={"key_file": audit_key_file(tmp_path, KEYS)},
    )
    channel = channel_to(svc)
    watch = await _health_watch(channel, "agent.v1.RecordsQuarantine")
    assert (await watch.read()).status == SERVING
    first = await run_events(channel)
    (failed,) = [e.execution_failed for e in first if e.HasField("execution_failed")]
    async with asyncio.timeout(30):  # three refusals, a pump round (1 s) apart
        assert (await watch.read()).status == NOT_SERVING
    second = await run_events(channel)  # later records are not held behind it
    assert second[-1].HasField("final_response")
    spool_path = svc.config.data_dir / "records-spool.db"
    async with asyncio.timeout(30):  # the summaries and the audit rows are written by different tasks
        while (  # noqa: ASYNC110 (another store)
            len(sql(postgres_schema, "SELECT run_id FROM run_summaries")) < 2
            or len(sql(postgres_schema, "SELECT run_id FROM audit")) < 2
        ):
            await asyncio.sleep(0.05)
    assert sql(postgres_schema, "SELECT run_id FROM audit ORDER BY seq") == [(first[0].run_id,), (second[0].run_id,)]
    assert sql(postgres_schema, "SELECT count(*) FROM dead_letters") == [(0,)]
    assert quarantined_gauge() == 1

    assert spool_cli.main(["--spool", str(spool_path), "list"]) == 0
    (listed,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert listed["kind"] == "dead_letter" and "no_flaky" in listed["error"]
    assert spool_cli.main(["--spool", str(spool_path), "show", str(listed["id"])]) == 0
    assert json.loads(capsys.readouterr().out)["body"]["execution_id"] == failed.execution_id

    sql(postgres_schema, "ALTER TABLE dead_letters DROP CONSTRAINT no_flaky")  # the operator fixed the cause
    assert spool_cli.main(["--spool", str(spool_path), "replay", "--all"]) == 0
    assert "1 record(s) moved back" in capsys.readouterr().out
    async with asyncio.timeout(30):  # the service finds it in its spool within a pump round and sends it
        assert (await watch.read()).status == SERVING
        while not sql(postgres_schema, "SELECT execution_id FROM dead_letters"):  # noqa: ASYNC110 (another store)
            await asyncio.sleep(0.05)
    assert sql(postgres_schema, "SELECT execution_id FROM dead_letters") == [(failed.execution_id,)]
    assert quarantined_gauge() == 0
    watch.cancel()
