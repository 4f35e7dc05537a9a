"""The audit chain's arithmetic, apart from any store: a row's MAC from its fields, the hash of the row before it and
a key (HMAC-SHA256), the head's MAC, the sha256 of rows written before keys, and the keyring that holds the keys by
id. Nothing here knows SQLite, so a shared store (PostgreSQL) computes and checks the same values.

Keys come from `AGENT_AUDIT_KEY`, else `audit.key_file`, else `audit.key` beside the audit database, generated on
the first start (0600). A source lists entries `ID:SECRET`, separated by commas, blanks or lines (`#` starts a
comment); the last entry signs new rows, the others only check old ones. A secret is used as its UTF-8 bytes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV_VAR = "AGENT_AUDIT_KEY"
DEFAULT_KEY_FILE = "audit.key"
GENESIS = "0" * 64
MIN_SECRET_CHARS = 32
# The record fields a row's hash or MAC covers, in storage order (the chain's fields, not SQLite's columns).
FIELDS = (
    "seq",
    "ts",
    "run_id",
    "metadata",
    "tool",
    "call_id",
    "input",
    "status",
    "duration_s",
    "result_bytes",
    "attempts",
    "cache_hit",
    "answered_by",
)
_KEY_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# Domain separation: a row's MAC can never pass for a head's, nor one format version's for another's.
_ROW = b"agent-audit-row-v1\n"
_HEAD = b"agent-audit-head-v1\n"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str).encode()


def row_mac(key: bytes, key_id: str, fields: Mapping[str, Any], prev_hash: str) -> str:
    """HMAC-SHA256 (hex) of a row: its `FIELDS` as stored (and its `trace_id` when it has one), the key id it names
    and the hash of the row before it (which chains the rows: changing, removing or reordering one breaks the next
    row's link)."""
    body = {name: fields[name] for name in FIELDS}
    if fields.get("trace_id"):  # rows on PostgreSQL carry the call's trace id: covered when there is one
        body["trace_id"] = fields["trace_id"]
    body["key_id"], body["prev_hash"] = key_id, prev_hash
    return hmac.new(key, _ROW + _canonical(body), hashlib.sha256).hexdigest()


def head_mac(key: bytes, key_id: str, seq: int, row_hash: str) -> str:
    """HMAC of the head (the last row's seq and hash): without it, dropping the newest rows and pointing the head at
    the row before would leave a chain that verifies."""
    return hmac.new(
        key, _HEAD + _canonical({"key_id": key_id, "seq": seq, "hash": row_hash}), hashlib.sha256
    ).hexdigest()


def legacy_hash(fields: Mapping[str, Any], prev_hash: str) -> str:
    """The unkeyed sha256 that rows written before keys carry: anyone can recompute it, so it proves nothing on its
    own; what follows such rows in a keyed row's `prev_hash` is what binds them."""
    body = {name: fields[name] for name in FIELDS}
    body["prev_hash"] = prev_hash
    return hashlib.sha256(_canonical(body)).hexdigest()


def same(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


class AuditKeyError(ValueError):
    """A key source that cannot be used: missing, unreadable, malformed, or a secret too short."""


@dataclass(frozen=True)
class Keyring:
    """Keys by id; `active` signs new rows. `source` says where the keys came from, for messages."""

    keys: Mapping[str, bytes]
    active: str
    source: str = ""

    @property
    def key(self) -> bytes:
        return self.keys[self.active]


def parse_keys(text: str, source: str) -> Keyring:
    """Entries `ID:SECRET`; the last one is active. A repeated id is refused: which secret it means would be a guess."""
    keys: dict[str, bytes] = {}
    active = ""
    entries = (e for line in text.splitlines() for e in re.split(r"[\s,]+", line.split("#", 1)[0]) if e)
    for number, entry in enumerate(entries, 1):
        key_id, sep, secret = entry.partition(":")
        if not sep or not _KEY_ID.fullmatch(key_id):  # the entry itself is not quoted: it may be a secret
            raise AuditKeyError(
                f"{source}: entry {number} is not ID:SECRET (an id of letters, digits, '.', '_' or '-', a colon, "
                "then the secret)"
            )
        if len(secret) < MIN_SECRET_CHARS:
            raise AuditKeyError(
                f"{source}: the secret of key {key_id!r} has {len(secret)} characters; use at least "
                f"{MIN_SECRET_CHARS} (e.g. the output of `openssl rand -hex 32`)"
            )
        if key_id in keys:
            raise AuditKeyError(f"{source}: key id {key_id!r} is listed twice")
        keys[key_id] = secret.encode()
        active = key_id
    if not keys:
        raise AuditKeyError(f"{source}: no key in it (expected entries ID:SECRET)")
    return Keyring(keys, active, source)


def read_key_file(path: Path) -> Keyring:
    try:
        text = path.read_text()
        st = path.stat()
    except OSError as exc:
        raise AuditKeyError(f"cannot read audit key file {path}: {exc.strerror or exc}") from exc
    mode = st.st_mode
    # Group access is fine when the group is this process's own: a Kubernetes Secret mounted with the pod's fsGroup
    # (= runAsGroup) is root-owned and group-readable, the only way the service's user can read it there.
    shared = stat.S_IRWXO | (0 if st.st_gid == os.getegid() else stat.S_IRWXG)
    if mode & shared:
        log.warning(
            "the audit key file is open to other users: whoever reads it can rewrite the audit log unnoticed",
            extra={"key_file": str(path), "mode": oct(mode & 0o777)},
        )
    return parse_keys(text, str(path))


def generate_key_file(path: Path) -> bool:
    """Write a new random key to `path`, private to this user (0600 whatever the umask); False when one was there
    already. The file is written whole under another name and linked into place, so a second process starting at the
    same moment reads a complete key, never half of one, and never writes a second."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = (
        "# audit log key, generated by the service; keep a copy where the database is not\n"
        f"auto-{secrets.token_hex(4)}:{secrets.token_hex(32)}\n"
    )
    fd, temp = tempfile.mkstemp(prefix=".audit-key-", dir=path.parent)  # mkstemp creates it 0600
    try:
        _write(fd, content)
        try:
            os.link(temp, path)
        except FileExistsError:
            return False
        except OSError:  # a filesystem without hard links: created in place, still exclusively
            try:
                _write(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), content)
            except FileExistsError:
                return False
    finally:
        os.unlink(temp)
    return True


def _write(fd: int, content: str) -> None:
    with os.fdopen(fd, "w") as f:
        f.write(content)
        f.flush()
        os.fsync(f.fileno())


def load_keyring(key_file: Path | None, db_path: Path, *, env: Mapping[str, str] | None = None) -> Keyring:
    """The writer's keys: the environment's, else `key_file`'s (which must exist: generating a key somewhere the
    operator named would hide a missing secret), else `audit.key` beside the database, generated if absent."""
    env = os.environ if env is None else env
    if env.get(ENV_VAR):
        return parse_keys(env[ENV_VAR], f"${ENV_VAR}")
    if key_file is not None:
        return read_key_file(key_file)
    default = db_path.parent / DEFAULT_KEY_FILE
    generated = not default.exists() and generate_key_file(default)
    keyring = read_key_file(default)
    if generated:
        log.info(
            "generated an audit key: the chain is keyed, but the key lives beside the database, so it only proves "
            "something to those who cannot read it; set audit.key_file or AGENT_AUDIT_KEY to keep it elsewhere",
            extra={"key_file": str(default), "key_id": keyring.active},
        )
    return keyring


def require_given_key(records_url: str | None, key_file: Path | None, *, env: Mapping[str, str] | None = None) -> None:
    """Refuse records on PostgreSQL (`records_url`) without a key the operator gave: one chain for the fleet needs one
    key, and a key made per replica splits trust (verify needs each, lost with the pod's emptyDir), while one kept in
    the database sits beside the rows it guards. Each process checks as it builds its records; a supervisor checks
    once before it starts its workers, which would all fail alike."""
    env = os.environ if env is None else env
    if records_url is not None and key_file is None and not env.get(ENV_VAR):
        raise AuditKeyError(
            "records.url is PostgreSQL, one audit chain for every replica, so its key must be given too: set "
            f"audit.key_file (a mounted Secret) or {ENV_VAR} (docs/audit.md#on-postgresql)"
        )


def verifier_keyring(key_file: Path | None, db_path: Path, *, env: Mapping[str, str] | None = None) -> Keyring | None:
    """The checker's keys: as the writer's, but never generated; None when there are none (keyed rows then fail
    with "unknown key id")."""
    env = os.environ if env is None else env
    if key_file is None and not env.get(ENV_VAR) and not (db_path.parent / DEFAULT_KEY_FILE).exists():
        return None
    return load_keyring(key_file, db_path, env=env)
