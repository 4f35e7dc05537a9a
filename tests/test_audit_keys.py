"""The audit chain's keys: rotation, unknown key ids, logs from before keys, the key made on a default start, the key
sources and their errors, the head logged and exported as an anchor, and the MAC's format pinned."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import sqlite3
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from test_audit import record

from service.records.audit import AuditLog, main, verify
from service.records.audit_chain import (
    ENV_VAR,
    AuditKeyError,
    Keyring,
    load_keyring,
    parse_keys,
    read_key_file,
    row_mac,
)

SECRET_1 = "1" * 64
SECRET_2 = "2" * 64


def keys(*entries: str) -> Keyring:
    return parse_keys("\n".join(entries), "test")


def write(path: Path, keyring: Keyring, start: int, count: int) -> None:
    log = AuditLog(path, keyring=keyring)
    for i in range(start, start + count):
        log.append(record(i))
    log.close()


def test_rotated_keys_verify_old_rows_with_theirs_and_new_rows_with_the_new_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "audit.db"
    write(path, keys(f"k1:{SECRET_1}"), 1, 3)
    write(path, keys(f"k1:{SECRET_1}", f"k2:{SECRET_2}"), 4, 2)  # k2 appended: the last key signs new rows
    with sqlite3.connect(path) as conn:
        assert [r[0] for r in conn.execute("SELECT key_id FROM audit ORDER BY seq")] == ["k1"] * 3 + ["k2"] * 2
    verdict = verify(path, keys(f"k1:{SECRET_1}", f"k2:{SECRET_2}"))
    assert verdict.ok and verdict.rows == 5 and verdict.key_ids == ("k1", "k2") and verdict.legacy == 0

    # the verifier holds the old key; the service may keep only the new one
    key_file = tmp_path / "keys"
    key_file.write_text(f"# retired\nk1:{SECRET_1}\nk2:{SECRET_2}\n")
    key_file.chmod(0o600)
    assert main(["verify", "--db", str(path), "--key-file", str(key_file)]) == 0
    assert "5 row(s), hash chain intact, MACs valid (keys k1, k2)" in capsys.readouterr().out

    key_file.write_text(f"k2:{SECRET_2}\n")  # the old key dropped: its rows can no longer be checked, and it says so
    assert main(["verify", "--db", str(path), "--key-file", str(key_file)]) == 1
    assert "row 1: unknown key id 'k1' (keys known: 'k2'" in capsys.readouterr().err


def test_a_row_naming_an_unknown_key_id_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "audit.db"
    ring = keys(f"k1:{SECRET_1}")
    write(path, ring, 1, 3)
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE audit SET key_id = 'k9' WHERE seq = 2")
    verdict = verify(path, ring)
    assert not verdict.ok and verdict.rows == 1
    assert verdict.problem.startswith("row 2: unknown key id 'k9' (keys known: 'k1', from test")
    # the same id under another secret is a wrong MAC, not an unknown key
    assert "row 1: wrong MAC under key 'k1'" in verify(path, keys(f"k1:{SECRET_2}")).problem


_OLD_SCHEMA = """
CREATE TABLE audit (
    seq INTEGER PRIMARY KEY, ts REAL NOT NULL, run_id TEXT NOT NULL, metadata TEXT NOT NULL, tool TEXT NOT NULL,
    call_id TEXT NOT NULL, input TEXT NOT NULL, status TEXT NOT NULL, duration_s REAL NOT NULL,
    result_bytes INTEGER NOT NULL, attempts INTEGER NOT NULL, cache_hit INTEGER NOT NULL, answered_by TEXT NOT NULL,
    prev_hash TEXT NOT NULL, hash TEXT NOT NULL
);
CREATE TABLE audit_head (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, hash TEXT NOT NULL);
"""


def write_legacy(path: Path, count: int) -> None:
    """A log as the service wrote it before keys: each row's hash the sha256 of its columns' canonical JSON."""
    with sqlite3.connect(path) as conn:
        conn.executescript(_OLD_SCHEMA)
        prev = "0" * 64
        for seq in range(1, count + 1):
            row: dict[str, Any] = {
                "seq": seq, "ts": 1.5 * seq, "run_id": f"run_{seq}", "metadata": "{}", "tool": "echo",
                "call_id": f"c{seq}", "input": '{"text":"x"}', "status": "ok", "duration_s": 0.25,
                "result_bytes": 3, "attempts": 1, "cache_hit": 0, "answered_by": "", "prev_hash": prev,
            }  # fmt: skip
            prev = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
            conn.execute(f"INSERT INTO audit VALUES ({', '.join('?' * 15)})", [*row.values(), prev])
        conn.execute("INSERT INTO audit_head VALUES (1, ?, ?)", (count, prev))


def test_a_log_from_before_keys_opens_verifies_and_continues_keyed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "audit.db"
    write_legacy(path, 3)
    ring = keys(f"k1:{SECRET_1}")
    old = verify(path, ring)  # untouched by a server with keys: still readable, flagged as proving nothing
    assert old.ok and old.rows == 3 and old.legacy == 3 and "NOT keyed" in old.summary()

    with caplog.at_level(logging.WARNING, logger="service.records.audit"):
        AuditLog(path, keyring=ring).close()  # opened: migrated, and its head signed at once
    assert any(r.getMessage().startswith("the audit log predates keys") for r in caplog.records)
    sealed = verify(path, ring)
    assert sealed.ok and sealed.legacy == 3 and "bound by the head's MAC" in sealed.summary()

    write(path, ring, 4, 2)
    assert main(["verify", "--db", str(path), "--key-file", str(_key_file(tmp_path, f"k1:{SECRET_1}"))]) == 0
    out = capsys.readouterr().out
    assert "5 row(s), hash chain intact, MACs valid (key k1); rows 1-3 are unkeyed-legacy" in out
    assert main(["tail", "--db", str(path), "-n", "5"]) == 0
    assert [json.loads(line)["key_id"] for line in capsys.readouterr().out.splitlines()] == [None] * 3 + ["k1"] * 2

    # a legacy row rewritten with its plain hash recomputed: the first keyed row's MAC covers the old hash
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE audit SET status = 'error' WHERE seq = 3")
        names = [r[1] for r in conn.execute("PRAGMA table_info(audit)") if r[1] not in ("hash", "key_id")]
        row = dict(
            zip(names, conn.execute(f"SELECT {', '.join(names)} FROM audit WHERE seq = 3").fetchone(), strict=True)
        )
        new = hashlib.sha256(json.dumps(row, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
        conn.execute("UPDATE audit SET hash = ? WHERE seq = 3", (new,))
        conn.execute("UPDATE audit SET prev_hash = ? WHERE seq = 4", (new,))
    assert "row 4: wrong MAC" in verify(path, ring).problem


def _key_file(folder: Path, *entries: str) -> Path:
    path = folder / "verifier.key"
    path.write_text("\n".join(entries) + "\n")
    path.chmod(0o600)
    return path


async def test_the_default_start_makes_a_private_key_and_keeps_using_it(
    start_service: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    key_file = tmp_path / "var" / "audit.key"
    umask = os.umask(0)  # a permissive umask must not widen it
    try:
        with caplog.at_level(logging.INFO, logger="service.records.audit_chain"):
            svc = await start_service()
    finally:
        os.umask(umask)
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    (generated,) = [r for r in caplog.records if r.getMessage().startswith("generated an audit key")]
    key_id = generated.key_id  # type: ignore[attr-defined]
    audit = svc.executor.audit
    audit.append(record(1))
    await audit.flush()
    await svc.close()
    again = await start_service()  # the same folder: the same key, no new one
    assert again.executor.audit.keyring.active == key_id
    assert not [name for name in os.listdir(key_file.parent) if "audit-key" in name]  # no temporary file left
    await again.close()
    verdict = verify(tmp_path / "var" / "audit.db")
    assert verdict.ok and verdict.rows == 1 and verdict.key_ids == (key_id,)


def test_the_cli_finds_the_keys_as_the_service_does(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    monkeypatch.delenv("AGENT_CONFIG", raising=False)
    key_file = _key_file(tmp_path, f"k1:{SECRET_1}")
    config = tmp_path / "config.yaml"
    config.write_text(f"data_dir: {tmp_path / 'var'}\naudit:\n  key_file: {key_file}\n")
    write(tmp_path / "var" / "audit.db", load_keyring(key_file, tmp_path / "var" / "audit.db"), 1, 2)
    assert main(["verify", "--config", str(config)]) == 0
    assert "2 row(s), hash chain intact, MACs valid (key k1)" in capsys.readouterr().out
    monkeypatch.setenv(ENV_VAR, f"k2:{SECRET_2}")  # the environment beats the config, as for the service
    assert main(["verify", "--config", str(config)]) == 1
    assert "row 1: unknown key id 'k1' (keys known: 'k2', from $AGENT_AUDIT_KEY" in capsys.readouterr().err
    assert not (tmp_path / "var" / "audit.key").exists()  # neither made a key of its own


def test_the_environment_key_wins_and_nothing_is_generated(tmp_path: Path) -> None:
    ring = load_keyring(
        tmp_path / "configured.key", tmp_path / "audit.db", env={ENV_VAR: f"old:{SECRET_1},new:{SECRET_2}"}
    )
    assert ring.active == "new" and set(ring.keys) == {"old", "new"}
    assert not (tmp_path / "audit.key").exists()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("k1", "entry 1 is not ID:SECRET"),
        ("k 1:" + SECRET_1, "entry 1 is not ID:SECRET"),
        (f"k1:{SECRET_1},\n{SECRET_2}", "entry 2 is not ID:SECRET"),  # a bare secret: not quoted back
        ("k1:short", "has 5 characters; use at least 32"),
        (f"k1:{SECRET_1}\nk1:{SECRET_2}", "key id 'k1' is listed twice"),
        ("# only a comment\n", "no key in it"),
    ],
)
def test_a_bad_key_source_is_refused_with_why(text: str, problem: str) -> None:
    with pytest.raises(AuditKeyError, match=problem) as refused:
        parse_keys(text, "the key file")
    assert SECRET_1[:8] not in str(refused.value) and SECRET_2[:8] not in str(refused.value)


async def test_a_configured_key_file_that_is_missing_stops_the_start(start_service: Any, tmp_path: Path) -> None:
    """Generating a key where the operator named one would hide that the secret was not mounted."""
    missing = tmp_path / "secrets" / "audit.key"
    with pytest.raises(ValueError, match=f"cannot read audit key file {missing}"):
        await start_service(audit={"key_file": str(missing)})
    assert not missing.exists()


class _Heads(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.interval = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage() == "audit chain head":
            self.records.append(record)
            if record.at == "interval":  # type: ignore[attr-defined]
                self.interval.set()


async def test_the_head_is_logged_at_start_when_it_moved_and_at_close(tmp_path: Path) -> None:
    heads = _Heads()
    logger = logging.getLogger("service.records.audit")
    logger.addHandler(heads)
    level = logger.level
    logger.setLevel(logging.INFO)
    now = [0.0]
    try:
        log = AuditLog(
            tmp_path / "audit.db", keyring=keys(f"k1:{SECRET_1}"), interval_s=0.001, head_log_interval_s=60,
            clock=lambda: now[0],
        )  # fmt: skip
        log.append(record(1))
        await log.flush()
        assert [r.at for r in heads.records] == ["start"]  # type: ignore[attr-defined]
        now[0] = 61.0  # the writer, waking every millisecond, finds the interval passed and the head moved
        assert await _wait(heads.interval)
        now[0] = 1000.0  # the head has not moved since: nothing more until close
        log.close()
    finally:
        logger.removeHandler(heads)
        logger.setLevel(level)
    assert [(r.at, r.audit_seq, r.key_id) for r in heads.records] == [  # type: ignore[attr-defined]
        ("start", 0, None),
        ("interval", 1, "k1"),
        ("close", 1, "k1"),
    ]
    assert heads.records[1].audit_hash == heads.records[2].audit_hash  # type: ignore[attr-defined]


async def _wait(event: threading.Event) -> bool:
    return await asyncio.to_thread(event.wait, 10)


def test_an_exported_head_catches_a_log_rewritten_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Rewritten whole as a log from before keys, key columns dropped, the file alone cannot tell; the head exported
    earlier (or logged) can."""
    path = tmp_path / "audit.db"
    ring = keys(f"k1:{SECRET_1}")
    write(path, ring, 1, 3)
    assert main(["head", "--db", str(path)]) == 0
    exported = capsys.readouterr().out.strip()
    assert json.loads(exported)["seq"] == 3 and json.loads(exported)["key_id"] == "k1"
    path.unlink()
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    write_legacy(path, 3)
    assert verify(path, ring).ok  # an old-format log: nothing in it says otherwise
    verdict = verify(path, ring, anchors=[(3, json.loads(exported)["hash"])])
    assert not verdict.ok and "row 3 does not match its anchor" in verdict.problem
    assert main(["verify", "--db", str(path), "--anchor", exported]) == 1
    assert "row 3 does not match its anchor" in capsys.readouterr().err
    assert main(["verify", "--db", str(path), "--anchor", "9:" + "0" * 64]) == 1
    assert "anchored row 9 is missing: the log ends at row 3" in capsys.readouterr().err
    assert main(["verify", "--db", str(path), "--anchor", "three"]) == 2


def test_the_row_mac_format_is_pinned() -> None:
    """A store on PostgreSQL computes the same value from the same fields; changing the format would orphan every
    stored row, so it changes only with a new version tag."""
    fields = {
        "seq": 7, "ts": 1700000000.25, "run_id": "run_1", "metadata": '{"caller":"risk"}', "tool": "echo",
        "call_id": "c1", "input": '{"text":"hi"}', "status": "ok", "duration_s": 0.5, "result_bytes": 13,
        "attempts": 1, "cache_hit": 0, "answered_by": "",
    }  # fmt: skip
    mac = row_mac(SECRET_1.encode(), "k1", fields, "ab" * 32)
    assert mac == row_mac(SECRET_1.encode(), "k1", dict(reversed(fields.items())), "ab" * 32)
    assert mac != row_mac(SECRET_1.encode(), "k2", fields, "ab" * 32)
    assert mac == "04785b2db1daa23adcd30c35ebc35ff795f3f24c969904469428496022cf63fc"


@pytest.mark.parametrize(
    ("mode", "group", "warned"),
    [
        (0o600, "own", False),
        (0o440, "own", False),  # a Kubernetes Secret under the pod's fsGroup: root-owned, readable by our group
        (0o440, "other", True),  # readable by a group this process is not
        (0o604, "own", True),  # readable by anyone
    ],
)
def test_a_key_file_open_to_others_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, mode: int, group: str, warned: bool
) -> None:
    path = _key_file(tmp_path, f"k1:{SECRET_1}")
    gid = os.getegid() if group == "own" else os.getegid() + 4242
    if gid != os.stat(path).st_gid:
        if os.geteuid() != 0:
            pytest.skip("changing a file's group to one this user is not in needs root")
        os.chown(path, -1, gid)
    path.chmod(mode)
    with caplog.at_level(logging.WARNING, logger="service.records.audit_chain"):
        assert read_key_file(path).active == "k1"
    assert any("open to other users" in r.getMessage() for r in caplog.records) is warned
