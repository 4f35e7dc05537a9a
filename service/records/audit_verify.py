"""Checking the audit log (`python -m service.records.audit verify`): each row's link to the one before, its MAC
under the key its id names (for rows written before keys, their plain hash, and that they come first), the head's
MAC, and heads anchored outside the database. The first row that fails is named, with why."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from service.config import load_config
from service.records.audit_chain import (
    ENV_VAR,
    FIELDS,
    GENESIS,
    AuditKeyError,
    Keyring,
    head_mac,
    legacy_hash,
    read_key_file,
    row_mac,
    same,
    verifier_keyring,
)

_HASH = re.compile(r"[0-9a-f]{64}")
_head_log = logging.getLogger("service.records.audit")  # the writers' logger, whichever store


class Head(NamedTuple):
    """The last row's seq and hash, the key id that signed them (None: written before keys) and their MAC."""

    seq: int
    hash: str
    key_id: str | None
    mac: str | None


class HeadLog:
    """The chain's head as a log line at start, every `interval_s` when it moved, and at close: kept by the log system,
    out of the database's reach, it lets `verify --anchor` find a log rewritten whole, or cut back to an older head.
    `where`: the fields that name the log. Both audit logs (`audit.py`, `pg_audit.py`) keep one."""

    def __init__(self, interval_s: float | None, clock: Callable[[], float], **where: str) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.where = where
        self.logged: Head | None = None
        self.logged_at = float("-inf")

    def log(self, head: Head | None, at: str) -> None:
        self.logged_at = self.clock()
        self.logged = head
        shown = head or Head(0, GENESIS, None, None)
        extra = {"at": at, "audit_seq": shown.seq, "audit_hash": shown.hash, "key_id": shown.key_id}
        _head_log.info("audit chain head", extra={**self.where, **extra})

    def moved(self, head: Head | None) -> None:
        """Log `head` if it moved since it was last logged, `interval_s` ago or more."""
        if self.interval_s is not None and head != self.logged and self.clock() - self.logged_at >= self.interval_s:
            self.log(head, "interval")


def columns(conn: sqlite3.Connection, table: str) -> set[str]:
    return {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}


def read_head(conn: sqlite3.Connection) -> Head | None:
    keyed = "mac" in columns(conn, "audit_head")
    row = conn.execute(f"SELECT seq, hash{', key_id, mac' if keyed else ''} FROM audit_head WHERE id = 1").fetchone()
    if row is None:
        return None
    return Head(int(row[0]), str(row[1]), *(row[2:] if keyed else (None, None)))


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    rows: int
    problem: str = ""
    legacy: int = 0  # rows 1..legacy were written before keys
    key_ids: tuple[str, ...] = ()
    head_signed: bool = False

    def summary(self) -> str:
        text = f"{self.rows} row(s), hash chain intact"
        if self.rows > self.legacy:
            text += f", MACs valid (key{'s' if len(self.key_ids) > 1 else ''} {', '.join(self.key_ids)})"
        if self.legacy:
            bound = (
                "bound by the keyed row after them"
                if self.rows > self.legacy
                else "bound by the head's MAC"
                if self.head_signed
                else "NOT keyed: they prove nothing against whoever can write the file; compare an anchored head"
            )
            text += f"; rows 1-{self.legacy} are unkeyed-legacy (written before keys; {bound})"
        return text


def verify(path: Path, keyring: Keyring | None = None, *, anchors: Sequence[tuple[int, str]] = ()) -> Verdict:
    """Walk the chain. `keyring` None: the keys the service would use (AGENT_AUDIT_KEY, else `audit.key` beside the
    database); `anchors` are (seq, hash) pairs kept elsewhere, each of which must still be in the log."""
    if keyring is None:
        keyring = verifier_keyring(None, path) or Keyring({}, "", "no key file beside the database")
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        names = [*FIELDS, "prev_hash", "hash"] + (["key_id"] if "key_id" in columns(conn, "audit") else [])
        rows = (
            dict(zip(names, v, strict=True)) for v in conn.execute(f"SELECT {', '.join(names)} FROM audit ORDER BY seq")
        )
        return walk(rows, lambda: read_head(conn), keyring, anchors, head_signed="mac" in columns(conn, "audit_head"))
    finally:
        conn.close()


def walk(
    rows: Iterable[dict[str, Any]],
    head: Callable[[], Head | None],
    keyring: Keyring,
    anchors: Sequence[tuple[int, str]] = (),
    *,
    head_signed: bool = True,
) -> Verdict:
    """Check `rows` (in seq order, as stored: any store's) and then the `head` they end at. `head_signed` False: a
    log no server with keys has opened yet, whose head never had a MAC."""
    wanted = dict(anchors)
    rows_seen, prev, legacy = 0, GENESIS, 0
    used: dict[str, None] = {}  # key ids in order of first use
    for row in rows:
        problem = _row_problem(row, rows_seen + 1, prev, keyring, keyed_before=bool(used))
        anchored = wanted.pop(row["seq"], None)
        if problem is None and anchored is not None and not same(anchored, str(row["hash"])):
            problem = f"row {row['seq']} does not match its anchor: the log was rewritten from that row or before"
        if problem is not None:
            return Verdict(False, rows_seen, problem, legacy, tuple(used))
        if row.get("key_id") is None:
            legacy += 1
        else:
            used[row["key_id"]] = None
        prev, rows_seen = str(row["hash"]), rows_seen + 1
    if wanted:
        problem = f"anchored row {min(wanted)} is missing: the log ends at row {rows_seen}"
    else:
        problem = _head_problem(head(), rows_seen, prev, keyring, signed=head_signed)
    return Verdict(problem is None, rows_seen, problem or "", legacy, tuple(used), head_signed)


def _row_problem(row: dict[str, Any], seq: int, prev: str, keyring: Keyring, *, keyed_before: bool) -> str | None:
    """Why row `seq` (following the row whose hash is `prev`) does not hold, or None."""
    key_id = row.get("key_id")
    if row["seq"] != seq:
        return f"row {seq} is missing (found row {row['seq']} next)"
    if not same(str(row["prev_hash"]), prev):
        return f"row {seq}: broken link: its prev_hash is not row {seq - 1}'s hash"
    if key_id is None:
        if keyed_before:
            return f"row {seq} has no key id but follows keyed rows: only rows from before keys may lack one"
        if not same(legacy_hash(row, prev), str(row["hash"])):
            return f"row {seq} was modified: its content does not match its hash (an unkeyed-legacy row)"
        return None
    key = keyring.keys.get(key_id)
    if key is None:
        return f"row {seq}: unknown key id {key_id!r} ({_known(keyring)})"
    if not same(row_mac(key, key_id, row, prev), str(row["hash"])):
        return (
            f"row {seq}: wrong MAC under key {key_id!r}: the row was modified (or its chain recomputed without the "
            f"key), or the secret given for {key_id!r} is not the one it was written with"
        )
    return None


def _head_problem(head: Head | None, rows: int, last_hash: str, keyring: Keyring, *, signed: bool) -> str | None:
    """The head must name the last row, and carry a valid MAC once the log has the columns for one."""
    if head is None:
        return "the log has no head row" if rows else None
    if head.seq != rows:
        return f"rows after {rows} are missing: the log's head is row {head.seq}"
    if not same(head.hash, last_hash):
        return f"the head's hash is not row {rows}'s"
    if not signed:
        return None  # a log no server with keys has opened yet: its head never had a MAC
    if head.key_id is None or head.mac is None:
        return "the head carries no MAC: it was written without the key (or by a server from before keys)"
    key = keyring.keys.get(head.key_id)
    if key is None:
        return f"the head: unknown key id {head.key_id!r} ({_known(keyring)})"
    if not same(head_mac(key, head.key_id, head.seq, head.hash), head.mac):
        return f"the head's MAC is wrong: the head was rewritten (were rows after row {rows} dropped?)"
    return None


def _known(keyring: Keyring) -> str:
    known = ", ".join(repr(k) for k in keyring.keys) or "none"
    return f"keys known: {known}, from {keyring.source}; give the missing one with --key-file or {ENV_VAR}"


def parse_anchor(text: str) -> tuple[int, str]:
    """`SEQ:HASH`, or the JSON object `head` prints (and the service logs as `audit_seq` / `audit_hash`)."""
    try:
        if text.lstrip().startswith("{"):
            data = json.loads(text)
            seq, row_hash = data.get("seq", data.get("audit_seq")), data.get("hash", data.get("audit_hash"))
        else:
            seq, _, row_hash = text.partition(":")
        anchor = (int(seq), str(row_hash))
    except (ValueError, TypeError, AttributeError) as exc:
        raise ValueError(f"anchor {text[:80]!r} is not SEQ:HASH nor the JSON `head` prints") from exc
    if anchor[0] < 1 or not _HASH.fullmatch(anchor[1]):
        raise ValueError(f"anchor {text[:80]!r}: want a row number from 1 and a 64-digit hex hash")
    return anchor


def add_key_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-file",
        type=Path,
        action="append",
        help=f"keys to check with, repeatable: one key ring of all the files' entries (default: ${ENV_VAR}, "
        "audit.key_file, audit.key beside the database)",
    )
    parser.add_argument(
        "--anchor",
        action="append",
        default=[],
        help="SEQ:HASH (or the JSON of `head`) kept outside the database: that row must still carry that hash",
    )


def cli_keyring(args: argparse.Namespace, db_path: Path) -> Keyring:
    """`--key-file`, else the keys the service would use: AGENT_AUDIT_KEY, `audit.key_file` from `--config` /
    AGENT_CONFIG, `audit.key` beside the database. Never generates one."""
    if args.key_file:
        return merge_keyrings([read_key_file(path) for path in args.key_file])
    config_file = args.config or (Path(os.environ["AGENT_CONFIG"]) if os.environ.get("AGENT_CONFIG") else None)
    key_file = load_config(config_file).audit.key_file if args.db is None or config_file else None
    return verifier_keyring(key_file, db_path) or Keyring({}, "", f"no key file beside {db_path}")


def merge_keyrings(rings: list[Keyring]) -> Keyring:
    """One ring of several files' keys (replicas that each had one, or retired keys kept apart from the current).
    An id given twice must name the same secret: which of two secrets it means would be a guess."""
    keys: dict[str, bytes] = {}
    for ring in rings:
        for key_id, secret in ring.keys.items():
            if keys.setdefault(key_id, secret) != secret:
                raise AuditKeyError(f"key id {key_id!r} has different secrets in {', '.join(r.source for r in rings)}")
    return Keyring(keys, rings[-1].active, ", ".join(r.source for r in rings))
