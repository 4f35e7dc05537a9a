"""The replicas under test: `python -m service` processes on one Redis prefix and one PostgreSQL schema, each on a
port of its own (0: the kernel's choice, read from its `serving` log line), killed with SIGKILL and started again
on the same data_dir (so with the same executor id, as a restarted pod keeps its name)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Backends:
    redis_url: str
    redis_prefix: str
    postgres_url: str  # its connections use the harness's schema first (search_path)


@dataclass
class Replica:
    name: str
    workdir: Path
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    started_at: float = 0.0
    kills: list[float] = field(default_factory=list)  # wall times of the SIGKILLs sent to it
    _drain: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.port != 0


def write_config(workdir: Path, backends: Backends | None, model_url: str, effects_url: str) -> Path:
    """The replicas' config; with no `backends`, the embedded default (one node: run state in memory, checkpoints
    and records in SQLite under data_dir)."""
    host = effects_url.removeprefix("http://")
    config: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "shutdown_grace_s": 2,
        "model": {
            "provider": "anthropic",
            "timeout_s": 10,
            "retry": {"attempts": 5, "initial_backoff_s": 0.05, "max_backoff_s": 0.5},
        },
        "durable": {"recover_interval_s": 0.5},
        "tools": {"http_request": {"allow_hosts": [host], "timeout_s": 5}},
        "runs": {"background_max_concurrent": 64},
    }
    if backends is not None:
        config["state"] = {"url": backends.redis_url, "prefix": backends.redis_prefix}
        config["records"] = {"url": backends.postgres_url}
        # one audit chain for the fleet needs one key, given (the service refuses to make one per replica)
        workdir.mkdir(parents=True, exist_ok=True)
        key_file = workdir / "audit.key"
        key_file.write_text(f"chaos:{secrets.token_hex(32)}\n")
        key_file.chmod(0o600)
        config["audit"] = {"key_file": str(key_file)}
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Fleet:
    """`size` replicas sharing `config`. `start()` starts them all; `kill(r)` sends SIGKILL and `restart(r)` starts
    it again; `live()` lists those serving."""

    def __init__(self, workdir: Path, config: Path, model_url: str, size: int) -> None:
        self.config = config
        self.model_url = model_url
        self.replicas = [Replica(f"r{i}", workdir / f"r{i}") for i in range(size)]

    async def start(self) -> None:
        await asyncio.gather(*(self.restart(r) for r in self.replicas))

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive]

    async def restart(self, replica: Replica, ready_within_s: float = 60.0) -> None:
        replica.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            "AGENT_DATA_DIR": str(replica.workdir / "var"),
            "ANTHROPIC_API_KEY": "chaos-key",
            "ANTHROPIC_BASE_URL": self.model_url,
            "GRPC_VERBOSITY": "ERROR",
            "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "service", "--config", str(self.config), "--log-level", "INFO"),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        replica.proc, replica.port = proc, 0
        serving: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        replica._drain = asyncio.create_task(_drain(proc, replica.workdir / "service.log", serving))
        replica.port = await asyncio.wait_for(serving, ready_within_s)
        replica.started_at = time.time()

    def holding(self, port: int) -> Replica | None:
        """The live replica with a connection from local port `port` (to the effect counter, say)."""
        for replica in self.live():
            assert replica.proc is not None
            with contextlib.suppress(psutil.Error):
                if any(c.laddr and c.laddr.port == port for c in psutil.Process(replica.proc.pid).net_connections()):
                    return replica
        return None

    def kill(self, replica: Replica) -> float:
        """SIGKILL, at once: no drain, no hand-over, as the OOM killer or a lost node does. Returns the wall time."""
        assert replica.proc is not None
        replica.proc.send_signal(signal.SIGKILL)
        replica.port = 0
        when = time.time()
        replica.kills.append(when)
        return when

    async def wait_dead(self, replica: Replica) -> None:
        if replica.proc is not None:
            await replica.proc.wait()
        if replica._drain is not None:
            with contextlib.suppress(Exception):
                await replica._drain

    async def stop(self) -> None:
        """SIGTERM to every live replica, then SIGKILL after 20 s: the harness's own end, not a fault."""
        for r in self.replicas:
            if r.proc is not None and r.proc.returncode is None:
                r.proc.send_signal(signal.SIGTERM)
        for r in self.replicas:
            if r.proc is None:
                continue
            try:
                await asyncio.wait_for(r.proc.wait(), 20)
            except TimeoutError:
                r.proc.kill()
                await r.proc.wait()
            await self.wait_dead(r)
            r.port = 0


async def _drain(proc: asyncio.subprocess.Process, log_path: Path, serving: asyncio.Future[int]) -> None:
    """Copy the process's JSON log lines to `log_path` (appending: a restart continues the file) as they come, so
    that its pipe never fills; resolve `serving` with the port its `serving` line names."""
    assert proc.stderr is not None
    with log_path.open("ab") as log:
        while line := await proc.stderr.readline():
            log.write(line)
            if not serving.done():
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    record = json.loads(line)
                    if record["msg"] == "serving":
                        serving.set_result(int(record["port"]))
    if not serving.done():
        serving.set_exception(RuntimeError(f"the service exited before serving; see {log_path}"))
