"""The audit log: append-only with a hash chain; `verify` catches an edited row and a deleted one (in the middle or
at the end); nothing is lost across a restart; the CLI's exit codes."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from fake_tools import all_tools
from service.events import Event, ToolResult
from service.executor import Executor, RunContext, ToolCallRequest
from service.records.audit import AuditLog, AuditRecord, main, verify
from service.redact import Redactor


def record(i: int) -> AuditRecord:
    return AuditRecord(
        ts=time.time(),
        run_id=f"run_{i}",
        metadata={"caller": "risk"},
        tool="echo",
        call_id=f"c{i}",
        input={"text": str(i)},
        status="ok",
        duration_s=0.001 * i,
        attempts=1,
        cache_hit=False,
        answered_by="",
        data={"echo": str(i)},
    )


def write(path: Path, start: int, count: int) -> None:
    log = AuditLog(path, queue_size=2)  # smaller than the batch: past it, append keeps records, never drops
    for i in range(start, start + count):
        log.append(record(i))
    log.close()


def test_chain_survives_a_restart_and_verifies(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "audit.db"
    write(path, 1, 5)
    write(path, 6, 3)  # a new process continues the chain
    verdict = verify(path)
    assert verdict.ok and verdict.rows == 8
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT result_bytes FROM audit WHERE seq = 1").fetchone()[0] == len('{"echo":"1"}')
    assert main(["verify", "--db", str(path)]) == 0
    assert "8 row(s), hash chain intact" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("tamper", "problem"),
    [
        ("UPDATE audit SET status = 'error' WHERE seq = 3", "row 3: wrong MAC"),
        ("DELETE FROM audit WHERE seq = 3", "row 3 is missing"),
        ("DELETE FROM audit WHERE seq = 1", "row 1 is missing"),
        ("DELETE FROM audit WHERE seq = 5", "rows after 4 are missing"),
    ],
)
def test_verify_names_the_tampered_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, problem: str
) -> None:
    path = tmp_path / "audit.db"
    write(path, 1, 5)
    with sqlite3.connect(path) as conn:
        conn.execute(tamper)
    verdict = verify(path)
    assert not verdict.ok and problem in verdict.problem
    assert main(["verify", "--db", str(path)]) == 1
    assert problem in capsys.readouterr().err


def test_rewriting_a_row_and_its_hash_still_breaks_the_next_link(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    write(path, 1, 3)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE audit SET hash = 'f' || substr(hash, 2), status = 'error' WHERE seq = 2")
    assert "row 2" in verify(path).problem


def _recompute_plain_chain(conn: sqlite3.Connection, start: int, *, unkey: bool = False) -> None:
    """What someone who can write the file but has no key does after editing row `start`: the hashes from it on
    recomputed with the public sha256 of the columns, each linked to the one before, and the head pointed at the new
    last hash (`unkey`: the rows also made to look as if written before keys)."""
    dropped = {"hash", "key_id"} if unkey else {"hash"}
    names = [r[1] for r in conn.execute("PRAGMA table_info(audit)") if r[1] not in dropped]
    if unkey:
        conn.execute("UPDATE audit SET key_id = NULL WHERE seq >= ?", (start,))
        conn.execute("UPDATE audit_head SET key_id = NULL, mac = NULL")
    prev = conn.execute("SELECT coalesce(max(hash), ?) FROM audit WHERE seq = ?", ("0" * 64, start - 1)).fetchone()[0]
    query = f"SELECT {', '.join(names)} FROM audit WHERE seq >= ? ORDER BY seq"
    for values in conn.execute(query, (start,)).fetchall():
        row = dict(zip(names, values, strict=True))
        row["prev_hash"] = prev
        prev = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        conn.execute("UPDATE audit SET prev_hash = ?, hash = ? WHERE seq = ?", (row["prev_hash"], prev, row["seq"]))
    conn.execute("UPDATE audit_head SET seq = (SELECT max(seq) FROM audit), hash = ?", (prev,))


@pytest.mark.parametrize(
    ("tamper", "start", "unkey", "problem"),
    [
        ("UPDATE audit SET status = 'error' WHERE seq = 3", 3, False, "row 3: wrong MAC"),
        ("UPDATE audit SET status = 'error' WHERE seq = 3", 3, True, "row 3 has no key id but follows keyed rows"),
        ("UPDATE audit SET input = '{}' WHERE seq = 2", 1, True, "the head carries no MAC"),
        ("DELETE FROM audit WHERE seq = 5", 5, False, "the head's MAC is wrong"),
    ],
)
def test_a_row_rewritten_with_its_chain_recomputed_is_found(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tamper: str, start: int, unkey: bool, problem: str
) -> None:
    """The chain was a plain sha256: editing a row (or dropping the newest one) and recomputing the hashes after it
    gave a log that `verify` called intact. Keyed, a row's hash is an HMAC that no one without the key can redo."""
    path = tmp_path / "audit.db"
    write(path, 1, 5)
    with sqlite3.connect(path) as conn:
        conn.execute(tamper)
        _recompute_plain_chain(conn, start, unkey=unkey)
    verdict = verify(path)
    assert not verdict.ok and problem in verdict.problem
    assert main(["verify", "--db", str(path)]) == 1
    assert problem in capsys.readouterr().err


def test_cli_without_a_log_says_so(tmp_path: Path) -> None:
    assert main(["verify", "--db", str(tmp_path / "none.db")]) == 2


def test_a_lone_surrogate_does_not_lose_the_batch(tmp_path: Path) -> None:
    """Half an emoji from the model's JSON, in a tool name it made up or an error quoting its input: sqlite3 refused
    the row, and the writer dropped the whole batch with it, other calls' records included."""
    path = tmp_path / "audit.db"
    log = AuditLog(path)
    log.append(record(1))
    log.append(dataclasses.replace(record(2), tool="ec\ud83dho", status="rejected", error="unknown tool \udc00"))
    log.append(record(3))
    log.close()
    verdict = verify(path)
    assert verdict.ok and verdict.rows == 3
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT tool FROM audit WHERE seq = 2").fetchone()[0] == "ec\ufffdho"


class _HeldRedactor(Redactor):
    """Holds the writer thread inside its batch until released: a writer that has fallen behind."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def value(self, value: Any) -> Any:
        self.entered.set()
        self.release.wait(10)
        return value


async def test_a_full_queue_makes_the_call_wait_never_the_event_loop_and_drops_nothing(tmp_path: Path) -> None:
    held = _HeldRedactor()
    log = AuditLog(tmp_path / "audit.db", queue_size=2, interval_s=0.001, redactor=held)
    try:
        log.append(record(1))
        assert await asyncio.to_thread(held.entered.wait, 10)  # the writer is busy with record 1
        log.append(record(2))
        log.append(record(3))
        assert log.full
        waiting = asyncio.create_task(log.room())
        for _ in range(20):  # the event loop goes on while the call waits
            await asyncio.sleep(0)
        assert not waiting.done()
        log.append(record(4))  # a record that cannot wait (a cancelled call's) is kept past the bound
        held.release.set()
        await asyncio.wait_for(waiting, 10)
        await asyncio.wait_for(log.flush(), 10)
    finally:
        held.release.set()
        log.close()
    verdict = verify(tmp_path / "audit.db")
    assert verdict.ok and verdict.rows == 4


async def _events(events: AsyncIterator[Event]) -> list[Event]:
    return [e async for e in events]


async def test_a_tool_call_waits_for_a_full_audit_queue_and_is_recorded(tmp_path: Path) -> None:
    held = _HeldRedactor()
    log = AuditLog(tmp_path / "audit.db", queue_size=1, interval_s=0.001, redactor=held)
    tools = all_tools()
    executor = Executor(tools, audit=log)
    try:
        log.append(record(1))
        assert await asyncio.to_thread(held.entered.wait, 10)
        log.append(record(2))  # full: the writer holds record 1, record 2 waits
        request = ToolCallRequest(call_id="c1", name="echo", input={"text": "a"})
        run = RunContext(run_id="run_t", offered=frozenset(tools))
        call = asyncio.create_task(_events(executor.execute(request, run)))
        for _ in range(50):
            await asyncio.sleep(0)
        assert not call.done()  # its result waits for the audit queue, and the event loop goes on meanwhile
        held.release.set()
        (result,) = [e for e in await asyncio.wait_for(call, 10) if isinstance(e, ToolResult)]
        assert result.ok
        await asyncio.wait_for(log.flush(), 10)
    finally:
        held.release.set()
        await executor.aclose()
    verdict = verify(tmp_path / "audit.db")
    assert verdict.ok and verdict.rows == 3


async def test_two_writers_on_one_file_continue_one_chain(tmp_path: Path) -> None:
    """Two servers on the same data_dir: each writer numbered rows from the head it read at its start, so the
    second's batches failed (UNIQUE on seq) and were lost."""
    path = tmp_path / "audit.db"
    first, second = AuditLog(path), AuditLog(path)
    try:
        for i in range(1, 7):
            log = first if i % 2 else second
            log.append(record(i))
            await asyncio.wait_for(log.flush(), 10)
    finally:
        first.close()
        second.close()
    verdict = verify(path)
    assert verdict.ok and verdict.rows == 6
