"""What the SQLite-backed stores (audit log, dead letters) share: the path from the config's URL, a connection in
WAL mode, and the config behind their command-line tools (which also read the PostgreSQL records database)."""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

from service.config import StoreConfig, load_config

_SCHEME = "sqlite:///"
_SURROGATE = re.compile("[\ud800-\udfff]")


def sqlite_path(store: StoreConfig, data_dir: Path, default_name: str) -> Path:
    """`sqlite:///rel/path` or `sqlite:////abs/path`; unset: `<data_dir>/<default_name>`."""
    if store.url is None:
        return data_dir / default_name
    if not store.url.startswith(_SCHEME):
        raise ValueError(f"unsupported store url {store.url!r}: only {_SCHEME}PATH is implemented")
    return Path(store.url.removeprefix(_SCHEME))


def connect(path: Path) -> sqlite3.Connection:
    """Autocommit connection (transactions are explicit), WAL so readers (the CLI) never block the writer, and
    synchronous=FULL because these rows are the record of what happened: a commit must survive a power cut.

    The file is the service's alone (0600, in a folder made 0700): SQLite gives its -wal and -shm files the mode
    of the database, and a sandboxed program running as another user must not read the records. A file an older
    version made 0644 is narrowed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600))
    for part in (path, path.with_name(f"{path.name}-wal"), path.with_name(f"{path.name}-shm")):
        with contextlib.suppress(FileNotFoundError):
            if part.stat().st_mode & 0o077:
                part.chmod(0o600)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout=5000")
    _set_wal(conn)
    conn.execute("PRAGMA synchronous=FULL")
    return conn


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on an autocommit connection (`connect`): the write lock taken at once (IMMEDIATE, so a
    busy database waits out busy_timeout here rather than fail at the first write), rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _set_wal(conn: sqlite3.Connection, tries: int = 100) -> None:
    """WAL mode, retried: two processes opening one new file at once (the workers of `--workers` starting together)
    race to change its journal mode, and SQLite answers the loser "database is locked" at once, without waiting
    out busy_timeout, since waiting there could deadlock. Start-up code: a blocking sleep is fine."""
    for attempt in range(tries):
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.01 * (1 + attempt % 5))


def storable(text: str) -> str:
    """`text` as SQLite can store it: a lone surrogate (half an emoji, as `json.loads` decodes the model's broken JSON,
    in a tool name or an error quoting the input) replaced by U+FFFD. sqlite3 refuses to bind one, which would lose
    the row, and with it the audit batch it was in."""
    return text if text.isascii() else _SURROGATE.sub("\ufffd", text)


def cli_db_path(args: argparse.Namespace, section: str, default_name: str) -> Path:
    """`--db` if given, else the path the service itself would use, from `--config` / AGENT_CONFIG and the
    environment (AGENT_DATA_DIR)."""
    if args.db is not None:
        return Path(args.db)
    config_file = args.config or (Path(os.environ["AGENT_CONFIG"]) if os.environ.get("AGENT_CONFIG") else None)
    config = load_config(config_file)
    store: StoreConfig = getattr(config, section)
    return sqlite_path(store, config.data_dir, default_name)


def cli_records_url(args: argparse.Namespace) -> str | None:
    """The PostgreSQL records database to read: `--url`, else (without `--db`) the config's `records.url`; None for
    the SQLite file."""
    if args.url is not None or args.db is not None:
        return str(args.url) if args.url is not None else None
    config_file = args.config or (Path(os.environ["AGENT_CONFIG"]) if os.environ.get("AGENT_CONFIG") else None)
    return load_config(config_file).records.url


def add_db_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", type=Path, help="SQLite file (default: from the service config)")
    where.add_argument("--url", help="PostgreSQL records database, postgresql://… (default: the config's records.url)")
    parser.add_argument("--config", type=Path, help="the service's YAML config (env AGENT_CONFIG)")


def display_url(url: str) -> str:
    """A database URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{userinfo.partition(':')[0]}{at}{host}" if at else url
