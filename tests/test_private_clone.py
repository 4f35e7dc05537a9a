"""The service starts, and its sandboxed tool works, from a checkout no other user can enter: root's home is mode
700, and so is what a fresh CI or container shell gives. The README's `make run` and client command are run from a
copy of the tracked files in a mode-700 folder, with this checkout's virtual environment (a `make install` there
would take a minute and prove nothing more)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "Which shipments are late?"

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux only")


@pytest.fixture
def private_clone() -> Iterator[Path]:
    """The tracked files (as they are in the working tree) copied into a mode-700 folder."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    with tempfile.TemporaryDirectory(prefix="private-clone-") as folder:
        home = Path(folder)
        home.chmod(0o700)
        clone = home / "agent-service"
        for name in filter(None, listed.decode().split("\0")):
            source, target = ROOT / name, clone / name
            if source.is_file():
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, target)
        # The clone's demo also asks the sandboxed tool: only the clone's code makes that call, so its answer shows
        # that the clone's code is what ran (this checkout's package is installed in the environment too).
        demo = clone / "service" / "scenarios" / "demo.yaml"
        text = demo.read_text()
        calls = "    tool_calls:\n"
        report = '      - name: shipment_report\n        input: {status: "late"}\n'
        assert calls in text
        demo.write_text(text.replace(calls, calls + report, 1))
        yield clone


def clone_env(clone: Path) -> dict[str, str]:
    """The environment of a shell in the clone: no config file and the default data folder (var/ in the clone),
    as the README runs it; ports chosen by the system."""
    env = {k: v for k, v in os.environ.items() if k not in {"AGENT_CONFIG", "AGENT_DATA_DIR", "ANTHROPIC_API_KEY"}}
    return {
        **env,
        "PYTHONPATH": f"{clone}{os.pathsep}{clone / 'generated'}",  # before the editable install of this checkout
        "AGENT_LISTEN": "127.0.0.1:0",
        "AGENT_METRICS_LISTEN": "127.0.0.1:0",
    }


async def test_make_run_and_the_client_work_from_a_private_clone(private_clone: Path) -> None:
    env = clone_env(private_clone)
    command = ["make", "run", f"PYTHON={sys.executable}"] if shutil.which("make") else [sys.executable, "-m", "service"]
    server = await asyncio.create_subprocess_exec(
        *command,
        cwd=private_clone,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # make and the service in one group, for the SIGTERM at the end
    )
    assert server.stderr is not None
    try:
        log = []
        while True:
            line = await asyncio.wait_for(server.stderr.readline(), 60)
            assert line, "the service exited before serving:\n" + "".join(log)
            log.append(line.decode())
            if line.startswith(b"{") and json.loads(line)["msg"] == "serving":
                port = json.loads(line)["port"]
                break
        client = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "service.client", "--target", f"127.0.0.1:{port}", "--json", QUESTION),
            cwd=private_clone,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(client.communicate(), 60)
        assert client.returncode == 0, err.decode()
        events = [json.loads(line) for line in out.decode().splitlines()]
        started = events[0]["runStarted"]
        assert "shipment_report" in started["tools"]
        report = next(e["toolResult"] for e in events if e.get("toolResult", {}).get("name") == "shipment_report")
        assert report["status"] == "TOOL_STATUS_OK", report
        assert report["data"]["status"] == "late" and report["data"]["matching"] > 0
        assert "finalResponse" in events[-1]
    finally:
        if server.returncode is None:
            os.killpg(server.pid, signal.SIGTERM)
            await asyncio.wait_for(server.wait(), 30)
    stderr = "".join(log) + (await server.stderr.read()).decode()
    assert "unavailable" not in stderr and "Traceback" not in stderr, stderr
    assert (private_clone / "var").stat().st_mode & 0o777 == 0o700
