"""Where the service keeps its files when nothing names a folder: `var` in the working folder, as `make run` in a
checkout has it, else the user's state folder, so that the offline demo serves wherever it is started; and what a
folder it cannot use says."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest

from service.config import load_config


@pytest.fixture
def no_data_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AGENT_DATA_DIR, and a state folder of the test's own; returns it."""
    monkeypatch.delenv("AGENT_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    return tmp_path / "state"


def test_var_in_a_working_folder_that_can_be_written(
    no_data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_config().data_dir == Path("var")


def test_the_state_folder_where_the_working_folder_is_root_or_cannot_be_written(
    no_data_dir: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir("/")  # as a service manager starts it: var would be the system's /var
    assert load_config().data_dir == no_data_dir / "agent-service"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a folder of another user's (root may write any)
    assert load_config().data_dir == no_data_dir / "agent-service"
    monkeypatch.setenv("AGENT_DATA_DIR", str(tmp_path / "named"))  # a folder named is the folder used
    assert load_config().data_dir == tmp_path / "named"


async def _service(cwd: Path, env: dict[str, str]) -> tuple[asyncio.subprocess.Process, list[str]]:
    server = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "service"),
        cwd=cwd,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    return server, []


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"AGENT_CONFIG", "AGENT_DATA_DIR", "ANTHROPIC_API_KEY"}}
    return {**env, "AGENT_LISTEN": "127.0.0.1:0", "AGENT_METRICS_LISTEN": "127.0.0.1:0", **extra}


async def test_the_demo_serves_when_started_from_the_root_folder(tmp_path: Path) -> None:
    """Before, its files went into the system's /var (as root), or it did not start ("Permission denied: 'var'")."""
    state = tmp_path / "state"
    env = _env(XDG_STATE_HOME=str(state))
    server, log = await _service(Path("/"), env)
    assert server.stderr is not None
    try:
        while True:
            line = await asyncio.wait_for(server.stderr.readline(), 60)
            assert line, "the service exited before serving:\n" + "".join(log)
            log.append(line.decode())
            if line.startswith(b"{") and json.loads(line)["msg"] == "serving":
                port = json.loads(line)["port"]
                break
        client = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "service.client", "--target", f"127.0.0.1:{port}", "--json", "Late shipments?"),
            cwd="/",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err.decode()
        assert "finalResponse" in json.loads(out.decode().splitlines()[-1])
    finally:
        server.send_signal(signal.SIGTERM)
        await asyncio.wait_for(server.wait(), 30)
    folder = state / "agent-service"
    assert (folder / "demo.db").is_file() and (folder / "audit.db").is_file()
    assert folder.stat().st_mode & 0o777 == 0o700


async def test_a_data_dir_that_cannot_be_made_stops_the_start_saying_what_to_do(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    named = tmp_path / "a-file" / "var"  # not a directory, even for root
    server, _ = await _service(tmp_path, _env(AGENT_DATA_DIR=str(named)))
    assert server.stderr is not None
    err = (await asyncio.wait_for(server.stderr.read(), 60)).decode()
    assert await server.wait() == 1
    last = err.strip().splitlines()[-1]
    # was "error: cannot start: [Errno 20] Not a directory: '…/a-file/var'"
    assert last.startswith(f"error: cannot start: data_dir '{named}' cannot be made or written"), err
    assert "set AGENT_DATA_DIR, or data_dir in the config" in last
