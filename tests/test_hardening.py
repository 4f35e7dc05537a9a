"""The service process against the programs it runs: its memory and environment unreadable to a process of its
user, its data folder and databases private, every child reaped. The end-to-end test runs a real service process as
a non-root user (nobody when the tests run as root), as the shipped image does, with a sandboxed tool whose program
tries to reach into it (tests/programs/reach.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import shutil
import signal
import site
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import make_config, run_events
from service.records.sqlite import connect
from service.wiring import build_tools
from tools._launcher import children, landlock_abi
from tools._sandbox import Identity, usable_by

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux only")

ROOT = Path(__file__).resolve().parent.parent
SECRET = "sk-ant-test-secret-3f9c1e"


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def as_service_user() -> dict[str, Any]:
    """subprocess arguments that run a process as the service's non-root user: nobody when the tests are root."""
    if os.geteuid() != 0:
        return {}
    nobody = pwd.getpwnam("nobody")
    return {"user": nobody.pw_uid, "group": nobody.pw_gid, "extra_groups": []}


@pytest.fixture
def open_folder() -> Iterator[Path]:
    """A folder every user can enter (pytest's tmp_path is root-only), so that only the modes tested decide."""
    with tempfile.TemporaryDirectory(prefix="hardening-") as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


def test_databases_are_private_files_in_a_private_folder(open_folder: Path) -> None:
    audit = open_folder / "var" / "audit.db"
    with closing(connect(audit)) as conn:
        conn.execute("CREATE TABLE t (x)")
        conn.execute("INSERT INTO t VALUES (1)")
        assert mode(audit.parent) == 0o700
        assert {p.name: mode(p) for p in audit.parent.iterdir()} == {
            "audit.db": 0o600,
            "audit.db-wal": 0o600,
            "audit.db-shm": 0o600,
        }
    older = open_folder / "older.db"  # made 0644 by an earlier version: narrowed when opened
    sqlite3.connect(older).close()
    older.chmod(0o644)
    connect(older).close()
    assert mode(older) == 0o600
    if os.geteuid() == 0:  # the sandbox user, even with the folder open to it, cannot read the file
        refused = subprocess.run(["cat", str(older)], capture_output=True, **as_service_user())
        assert refused.returncode != 0 and b"Permission denied" in refused.stderr


def test_the_data_folder_is_made_private(open_folder: Path) -> None:
    build_tools(make_config(open_folder, data_dir=open_folder / "made" / "var"))
    assert mode(open_folder / "made" / "var") == 0o700
    (open_folder / "volume").mkdir(mode=0o755)
    build_tools(make_config(open_folder, data_dir=open_folder / "volume"))  # a folder that is there: left as it is
    assert mode(open_folder / "volume") == 0o755


REAPER = textwrap.dedent(
    """
    import asyncio, json, os, subprocess
    from tools._children import OrphanReaper, become_subreaper, track, untrack

    now = 0.0
    reaper = OrphanReaper(grace_s=1.0, clock=lambda: now)

    def state(pid):
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rpartition(")")[2].split()[0]
        except OSError:
            return None

    async def zombie(pid):
        while state(pid) != "Z":
            await asyncio.sleep(0.005)

    async def main():
        global now
        become_subreaper()
        # An orphan: sh starts sleep in the background and exits; sleep comes here and ends a moment later.
        sh = await asyncio.create_subprocess_exec("sh", "-c", "sleep 0.05 & echo $!", stdout=asyncio.subprocess.PIPE)
        orphan = int(await sh.stdout.read())
        await sh.wait()
        await zombie(orphan)
        first = reaper.sweep()
        # asyncio's own children, ending while the reaper sweeps: their exit status is asyncio's
        codes = []
        for code in (3, 7):
            proc = await asyncio.create_subprocess_exec("sh", "-c", f"exit {code}")
            while proc.returncode is None:
                reaper.sweep()
                await asyncio.sleep(0.001)
            codes.append(proc.returncode)
        # a tracked child (a running launcher, as far as the reaper knows) is not taken, however long a zombie
        tracked = subprocess.Popen(["true"])
        track(tracked.pid)
        await zombie(tracked.pid)
        now = 10.0
        second = reaper.sweep()
        untrack(tracked.pid)
        tracked_code = tracked.wait()
        print(json.dumps({
            "orphan": orphan, "first": first, "second": second, "left": state(orphan),
            "codes": codes, "tracked_code": tracked_code,
        }))

    asyncio.run(main())
    """
)


async def test_the_reaper_takes_orphans_and_leaves_asyncios_children() -> None:
    # In a process of its own: a subreaper and a reaper change the whole process.
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", REAPER, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    seen = json.loads(out)
    assert seen["first"] == [], "reaped on first sight: it could have been a child asyncio was about to wait for"
    assert seen["second"] == [seen["orphan"]] and seen["left"] is None
    assert seen["codes"] == [3, 7] and seen["tracked_code"] == 0
    assert b"Unknown child process" not in err


def service_python() -> tuple[str, dict[str, str]]:
    """An interpreter the service's non-root user can run with this checkout's packages, and its environment."""
    paths = [ROOT, ROOT / "generated", ROOT / "tests", *map(Path, site.getsitepackages())]
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": os.pathsep.join(map(str, paths)),
        "ANTHROPIC_API_KEY": SECRET,
        "GRPC_VERBOSITY": "ERROR",
    }
    if os.geteuid() != 0:
        return sys.executable, env
    nobody = Identity.lookup("nobody")
    # The tests' interpreter may be under root's home; the system's Python of the same version loads the same wheels.
    for candidate in (sys.executable, shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")):
        if candidate and usable_by(Path(candidate), nobody, execute=True):
            probe = f"import sys, service.rpc.server; assert sys.version_info[:2] == {tuple(sys.version_info[:2])}"
            done = subprocess.run([candidate, "-c", probe], env=env, capture_output=True, **as_service_user())
            if done.returncode == 0:
                return candidate, env
    pytest.skip("no Python that user nobody can run imports this checkout")


@pytest.fixture
async def service_process() -> AsyncIterator[tuple[int, int, Path, list[dict[str, Any]]]]:
    """`python -m service` as the non-root user, with the reach and hold tools: (pid, port, data folder, log)."""
    python, env = service_python()
    with tempfile.TemporaryDirectory(prefix="hardening-service-") as folder:
        home = Path(folder)
        if os.geteuid() == 0:
            os.chown(home, pwd.getpwnam("nobody").pw_uid, -1)
        scenario = {"name": "reach", "turns": [{"tool_calls": [{"name": "reach"}, {"name": "hold"}]}, {"text": "ok"}]}
        (home / "scenario.json").write_text(json.dumps(scenario))
        config = {
            "listen": "127.0.0.1:0",
            "metrics_listen": "127.0.0.1:0",
            "data_dir": str(home / "var"),
            "tool_modules": ["reach_tools", "hold_tool"],
            # one user for the service and its programs: RLIMIT_NPROC counts the service's threads too (security.md)
            "tools": {"reach": {"max_processes": 32}},
            "model": {"provider": "scripted", "scenario": str(home / "scenario.json")},
        }
        (home / "config.json").write_text(json.dumps(config))  # YAML is a superset of JSON
        proc = await asyncio.create_subprocess_exec(
            *(python, "-m", "service", "--config", str(home / "config.json")),
            cwd=home,
            env=env,
            stderr=asyncio.subprocess.PIPE,
            **as_service_user(),
        )
        assert proc.stderr is not None
        log: list[dict[str, Any]] = []
        try:
            while not log or log[-1].get("msg") != "serving":
                line = await asyncio.wait_for(proc.stderr.readline(), 60)
                assert line, f"the service exited: {log}"
                log.append(json.loads(line))

            async def keep_reading() -> None:
                assert proc.stderr is not None
                while line := await proc.stderr.readline():
                    log.append(json.loads(line))

            reader = asyncio.create_task(keep_reading())
            yield proc.pid, log[-1]["port"], home / "var", log
        finally:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 30)
            await reader


def zombies_of(pid: int) -> list[int]:
    found = []
    for child in children(pid):
        with contextlib.suppress(OSError), open(f"/proc/{child}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                found.append(child)
    return found


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def polled(find: Callable[[], Any]) -> Any:
    """What `find` returns once it is truthy, within 15 s: process states in /proc come with no notification."""
    for _ in range(750):
        if found := find():
            return found
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 15 s: {find}")


async def test_a_program_of_the_services_user_cannot_reach_into_it(
    service_process: tuple[int, int, Path, list[dict[str, Any]]],
) -> None:
    pid, port, data, log = service_process
    # Any process of the service's user, sandboxed or not, finds its environment (the API key) closed.
    cat = await asyncio.create_subprocess_exec(
        "cat",
        f"/proc/{pid}/environ",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        **as_service_user(),
    )
    out, err = await cat.communicate()
    assert cat.returncode != 0 and b"Permission denied" in err and SECRET.encode() not in out
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        events = await run_events(channel, message="reach", tools=["reach"])
        result = next(e.tool_result for e in events if e.HasField("tool_result"))
        assert result.status == pb.TOOL_STATUS_OK, result.error
        reached = json.loads(json.dumps(dict(result.data.struct_value)))
        assert reached["read_environ"] == "PermissionError"
        if landlock_abi():  # the audit log is its user's own file: only Landlock keeps a same-user program out
            assert reached["read_audit"] == reached["write_audit"] == "PermissionError"
        if landlock_abi() >= 6:
            assert reached["signal_service"] == "PermissionError"
        assert gone(int(reached["daemon"])), "the program's daemon outlived the call"
        assert zombies_of(pid) == []
        assert mode(data) == 0o700 and mode(data / "audit.db") == mode(data / "deadletter.db") == 0o600

        # A launcher killed under its program: the program dies with it (parent-death signal), is re-parented
        # to the service, its subreaper, and the service reaps it.
        held = asyncio.create_task(run_events(channel, message="hold", tools=["hold"]))
        launcher = (await polled(lambda: [c for c in children(pid) if children(c)]))[0]
        (program,) = children(launcher)
        os.kill(launcher, signal.SIGKILL)
        events = await held
        result = next(e.tool_result for e in events if e.HasField("tool_result"))
        assert result.status == pb.TOOL_STATUS_ERROR and "hold was killed" in result.error
        await polled(lambda: gone(program))
        assert zombies_of(pid) == []
        # the service's log is read from its stdout as it comes: the line may trail the reaping a little
        await polled(
            lambda: any(program in line.get("pids", []) for line in log if line["msg"] == "reaped orphaned processes")
        )
