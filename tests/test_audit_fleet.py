"""One audit chain for a fleet on PostgreSQL records, signed with keys the operator gives (docs/audit.md): two real
server processes sharing a key make one chain `verify` accepts, their dead letters listed together; a row signed
by a key `verify` is not given fails clearly; a rotated ring (old keys kept for checking) verifies; a replica
without a given key refuses to start."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any

import grpc
import psycopg
from backends import AUDIT_KEYS, PostgresSchema, audit_key_file
from test_durable_process import Fleet
from test_records_pg import record

from conftest import run_events
from fake_anthropic import FakeAnthropic
from service.records import audit, deadletter
from service.records.audit_chain import parse_keys
from service.records.pg_audit import PgAuditLog
from service.records.postgres import PgRecords

OLD = "2026-q3:" + "3" * 64
NEW = "2026-q4:" + "4" * 64


def rows(pg: PostgresSchema, query: str) -> list[Any]:
    with psycopg.connect(pg.url, autocommit=True) as conn:
        return conn.execute(query).fetchall()


async def write(pg: PostgresSchema, folder: Path, keys: str, n: int, writer: str) -> None:
    """`n` rows appended to the chain by an in-process writer signing with `keys` (its last entry)."""
    db = PgRecords(pg.url, spool_path=folder / "spool.db")
    await db.open()
    log = PgAuditLog(db, keyring=parse_keys(keys, writer))
    for i in range(n):
        log.append(record(i, writer))
    await log.aclose()
    db._users = 1  # the store is shared by its users; this test is its only one
    await db.release()


async def test_two_server_processes_with_one_key_make_one_chain_that_verify_accepts(
    tmp_path: Path, postgres_schema: PostgresSchema, capsys: Any
) -> None:
    """And their dead letters are listed together: the `effect` tool's log is a folder, so its call fails in both."""
    key_file = audit_key_file(tmp_path)
    (tmp_path / "effect.log").mkdir()
    async with FakeAnthropic() as fake:
        for _ in range(2):  # one run on each process: a call of `effect`, then the answer
            fake.script_turn("Working.", tool_uses=[("effect", {"text": "a"})])
            fake.script_turn("done")
        fleet = Fleet(tmp_path, fake, records={"url": postgres_schema.url}, audit={"key_file": str(key_file)})
        try:
            run_ids = []
            for name in ("a", "b"):
                _, port = await fleet.start(name)
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    events = await run_events(channel)
                assert events[-1].HasField("final_response")
                run_ids.append(events[0].run_id)
        finally:
            await fleet.stop()  # SIGTERM: each flushes its audit batch before it exits
    chain = rows(postgres_schema, "SELECT seq, run_id, status, key_id FROM audit ORDER BY seq")
    assert chain == [(1, run_ids[0], "error", "fleet-1"), (2, run_ids[1], "error", "fleet-1")]  # one chain, both
    assert not any((tmp_path / name / "audit.key").exists() for name in ("a", "b"))  # no key of their own
    assert audit.main(["verify", "--url", postgres_schema.url, "--key-file", str(key_file)]) == 0
    assert "2 row(s), hash chain intact, MACs valid (key fleet-1)" in capsys.readouterr().out
    assert deadletter.main(["list", "--url", postgres_schema.url]) == 0
    listed = capsys.readouterr().out
    assert all(f"run={run_id}" in listed for run_id in run_ids) and listed.count("effect  error") == 2, listed


async def test_a_row_signed_by_a_key_verify_was_not_given_fails_clearly(
    tmp_path: Path, postgres_schema: PostgresSchema, capsys: Any
) -> None:
    await write(postgres_schema, tmp_path / "a", AUDIT_KEYS, 2, "a")
    await write(postgres_schema, tmp_path / "rogue", "rogue:" + "9" * 64, 1, "r")  # a replica with a key of its own
    assert rows(postgres_schema, "SELECT key_id FROM audit ORDER BY seq") == [("fleet-1",), ("fleet-1",), ("rogue",)]
    assert audit.main(["verify", "--url", postgres_schema.url, "--key-file", str(audit_key_file(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "row 3: unknown key id 'rogue' (keys known: 'fleet-1'" in err and "(2 row(s) verified before it)" in err


async def test_a_rotated_ring_verifies_with_the_old_key_kept_and_not_without_it(
    tmp_path: Path, postgres_schema: PostgresSchema, capsys: Any
) -> None:
    await write(postgres_schema, tmp_path / "a", OLD, 2, "a")
    await write(postgres_schema, tmp_path / "b", f"{OLD}\n{NEW}", 2, "b")  # rotated: NEW appended, signs from now
    assert [k for (k,) in rows(postgres_schema, "SELECT key_id FROM audit ORDER BY seq")] == [
        "2026-q3",
        "2026-q3",
        "2026-q4",
        "2026-q4",
    ]
    old, new = audit_key_file(tmp_path, OLD), audit_key_file(tmp_path, NEW)
    url = postgres_schema.url
    assert audit.main(["verify", "--url", url, "--key-file", str(new)]) == 1  # the retired key is needed
    assert "row 1: unknown key id '2026-q3'" in capsys.readouterr().err
    assert audit.main(["verify", "--url", url, "--key-file", str(old), "--key-file", str(new)]) == 0  # a ring of two
    assert "4 row(s), hash chain intact" in capsys.readouterr().out
    assert audit.main(["verify", "--url", url, "--key-file", str(audit_key_file(tmp_path, f"{OLD}\n{NEW}"))]) == 0
    capsys.readouterr()
    other = audit_key_file(tmp_path, "2026-q4:" + "7" * 64)  # the same id with another secret: refused, not guessed
    assert audit.main(["verify", "--url", url, "--key-file", str(new), "--key-file", str(other)]) == 2
    assert "key id '2026-q4' has different secrets" in capsys.readouterr().err


async def test_a_replica_on_postgresql_records_without_a_given_key_refuses_to_start(
    tmp_path: Path, postgres_schema: PostgresSchema
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"listen: 127.0.0.1:0\nmetrics_listen: 127.0.0.1:0\nrecords: {{url: '{postgres_schema.url}'}}\n")
    env = {k: v for k, v in os.environ.items() if k != "AGENT_AUDIT_KEY"}
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "service", "--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
        env={**env, "AGENT_DATA_DIR": str(tmp_path / "var"), "ANTHROPIC_API_KEY": ""},
    )
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1, err.decode()
    assert "its key must be given too: set audit.key_file (a mounted Secret) or AGENT_AUDIT_KEY" in err.decode()
    assert "Traceback" not in err.decode()
    assert not (tmp_path / "var" / "audit.key").exists()  # no key made that the fleet could not share
