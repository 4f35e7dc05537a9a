"""What a sandboxed program cannot get out of: its call's process tree (setsid, double fork) and, with Landlock, the
file system beyond its working directory, TCP, and signals to processes outside its call. Every program here is
bounded by itself (it sleeps at most 30 s)."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tools._launcher import landlock_abi
from tools._sandbox import Sandbox, SandboxOptions

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux only")

ESCAPE = """
import json, os, sys, time
request = json.load(sys.stdin)
ready_r, ready_w = os.pipe()
if os.fork() == 0:
    os.setsid()  # out of the call's process group and session
    if request["daemon"] and os.fork() > 0:
        os._exit(0)  # the classic daemon: its child is orphaned at once
    with open(request["escapee"], "w") as f:
        f.write(str(os.getpid()))
    os.write(ready_w, b"x")
    time.sleep(30)  # still holding the call's stdout
    os._exit(0)
os.close(ready_w)
os.read(ready_r, 1)
print(json.dumps({"left": True}))
"""

PROBE = """
import json, os, socket, sys
request = json.load(sys.stdin)
results = {}

def attempt(name, action):
    try:
        action()
        results[name] = "allowed"
    except OSError as exc:
        results[name] = type(exc).__name__

def connect():
    socket.create_connection(("127.0.0.1", request["port"]), timeout=5).close()

attempt("read_own", lambda: open("staged.txt").read())
attempt("write_own", lambda: open("new.txt", "w").write("x"))
attempt("read_system", lambda: os.listdir("/usr/lib"))
attempt("read_outside", lambda: open(request["outside_file"]).read())
attempt("list_outside", lambda: os.listdir(request["outside_dir"]))
attempt("write_outside", lambda: open(os.path.join(request["outside_dir"], "new.txt"), "w").write("x"))
attempt("read_etc", lambda: open("/etc/hostname").read())
attempt("read_service_environ", lambda: open(f"/proc/{request['service']}/environ", "rb").read())
attempt("signal_outsider", lambda: os.kill(request["outsider"], 0))
attempt("tcp_connect", connect)
print(json.dumps(results))
"""


@pytest.fixture
def shared() -> Iterator[Path]:
    """A folder the sandbox user can reach and write (pytest's tmp_path is root-only)."""
    with tempfile.TemporaryDirectory(prefix="sandbox-containment-") as folder:
        root = Path(folder)
        root.chmod(0o1777)
        yield root


def write_program(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.py"
    path.write_text(textwrap.dedent(text))
    return path


def gone(pid: int) -> bool:
    """Neither running nor a zombie: `kill(pid, 0)` succeeds on both."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.parametrize("daemon", [False, True], ids=["setsid", "setsid-and-double-fork"])
async def test_a_program_that_leaves_its_group_is_killed_and_reaped_with_the_call(shared: Path, daemon: bool) -> None:
    escapee = shared / "escapee"
    escapee.touch()
    escapee.chmod(0o666)
    box = Sandbox.for_python(
        write_program(shared, "escape", ESCAPE), SandboxOptions(timeout_s=20, write_paths=[escapee]), name="escape"
    )
    started = time.monotonic()
    result = await box.run({"escapee": str(escapee), "daemon": daemon})
    assert result == {"left": True}
    # The escapee held stdout open: the call ended when the program did, not at its 20 s timeout.
    assert time.monotonic() - started < 10
    pid = int(escapee.read_text())
    assert gone(pid), "the process that left the call's group outlived the call (or is a zombie)"


@pytest.mark.skipif(landlock_abi() == 0, reason="no Landlock in this kernel")
async def test_landlock_keeps_the_program_to_its_working_directory(shared: Path) -> None:
    outside = shared / "outside"
    outside.mkdir(mode=0o777)
    outside.chmod(0o777)  # past the umask: only Landlock stands between the program and this folder
    (outside / "note.txt").write_text("readable by everyone")
    (outside / "note.txt").chmod(0o644)
    staged = shared / "staged.txt"
    staged.write_text("staged")
    sandbox_user: dict[str, Any] = {"user": "nobody"} if os.geteuid() == 0 else {}
    # Another process of the sandbox's user, outside the call: a same-user program could signal it without Landlock.
    outsider = await asyncio.create_subprocess_exec("sleep", "30", **sandbox_user)
    listener = socket.create_server(("127.0.0.1", 0))
    box = Sandbox.for_python(write_program(shared, "probe", PROBE), SandboxOptions(), name="probe")
    try:
        request = {
            "outside_file": str(outside / "note.txt"),
            "outside_dir": str(outside),
            "service": os.getpid(),
            "outsider": outsider.pid,
            "port": listener.getsockname()[1],
        }
        results = await box.run(request, files={"staged.txt": staged})
    finally:
        outsider.kill()
        await outsider.wait()
        listener.close()
    abi = landlock_abi()
    assert results["read_own"] == results["write_own"] == results["read_system"] == "allowed"
    assert results["read_outside"] == results["list_outside"] == results["write_outside"] == "PermissionError"
    assert results["read_etc"] == "PermissionError" and results["read_service_environ"] == "PermissionError"
    assert not (outside / "new.txt").exists()
    assert results["tcp_connect"] == ("PermissionError" if abi >= 4 else "allowed")
    assert results["signal_outsider"] == ("PermissionError" if abi >= 6 else "allowed")


async def test_tcp_can_be_allowed(shared: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    program = write_program(shared, "probe", PROBE)
    box = Sandbox.for_python(program, SandboxOptions(tcp=True), name="probe")
    request = {"outside_file": "/", "outside_dir": "/", "service": 1, "outsider": 1, "port": listener.getsockname()[1]}
    try:
        results = await box.run(request, files={"staged.txt": program})
    finally:
        listener.close()
    assert results["tcp_connect"] == "allowed"
