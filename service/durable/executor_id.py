"""This process's executor id: the owner it writes on the durable runs it drives. Stable across restarts of one
process on one node (kept in data_dir), so that a restarted single node finds its own runs and continues them; set it
(`durable.executor_id`, AGENT_EXECUTOR_ID) where data_dir does not outlive the process but a name does, such as a
StatefulSet's pod name. Two live processes must never share one: the stores refuse to open with an id held by a
live process (a PostgreSQL advisory lock, or a lock file beside the SQLite file)."""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
from pathlib import Path

FILE = "executor_id"
_VALID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def executor_id(data_dir: Path, configured: str | None = None, *, worker: int | None = None) -> str:
    """`configured` if set, else the id kept in `data_dir` (made on the first start: host name and a random part);
    `worker` (the index under --workers N) makes each worker of one machine an id of its own."""
    base = configured if configured else _kept(data_dir)
    if not _VALID.fullmatch(base):
        raise ValueError(f"executor id {base!r}: 1-128 of A-Z a-z 0-9 . _ : - (not starting with a sign)")
    return base if worker is None else f"{base}-w{worker}"


def _kept(data_dir: Path) -> str:
    path = data_dir / FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text().strip()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    host = re.sub(r"[^A-Za-z0-9.-]", "-", socket.gethostname())[:64] or "host"
    made = f"{host}-{secrets.token_hex(4)}"
    # Written whole to a private name, then linked into place: link() fails if the name exists, so of two processes
    # starting together on one data_dir both end up with the first one's id, and neither can read a half-written file
    # (an O_EXCL create is visible, empty, before its write lands: a peer once read '' there).
    draft = data_dir / f".{FILE}.{os.getpid()}.{secrets.token_hex(4)}"
    with os.fdopen(os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
        f.write(made + "\n")
    try:
        os.link(draft, path)
    except FileExistsError:
        return path.read_text().strip()
    finally:
        draft.unlink()
    return made
