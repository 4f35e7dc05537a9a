"""Sandboxed tools: a registered program run in a subprocess, its input as JSON on stdin, its result as JSON on
stdout, under time, CPU, memory, file-size, process-count and output limits.

The containment contract of `Sandbox.run`, whatever happens (normal end, timeout, output overflow, a failure of
the service, or cancellation of the calling task):

- the program runs in its own session and process group; when the call ends the whole group is killed with
  SIGKILL and reaped before `run` returns or raises, even when cancelled again during that cleanup
  (`CancelledError` is re-raised after it, never swallowed);
- limits are set by `prlimit(1)` and the user changed by `setpriv(1)` (util-linux) as the program is exec'd, so
  the service only vfork()s: no Python and no fork handler runs in a forked copy of the threaded service
  (`preexec_fn`/`user=` and a full fork() are only the fallback where those commands are missing);
- when the service runs as root, the program runs as `user` (default `nobody`) with no supplementary groups:
  the process-count limit does not bind root; `no_new_privs` is set, so no setuid binary gains privileges;
- the environment holds only PATH, LANG, LC_ALL, HOME and TMPDIR (plus `env` from the options): no secret of
  the service (API keys, tokens) reaches the program;
- the working directory is a fresh temporary directory (the program's HOME and TMPDIR too), removed afterwards.

This contains runaway programs; it is not an isolation boundary for hostile code (no namespaces, no seccomp
filter, the file system is visible as the user may see it). A program that calls setsid() leaves the process
group; the limits still bind it. See the README, "Security".

The module name starts with an underscore so that `tools.load_tools` does not take it for a tool.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import pwd
import resource
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tools.base import JSON, InputT, Tool, ToolConfig, ToolError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_PR_SET_CHILD_SUBREAPER = 36


class SandboxOptions(BaseModel):
    """Limits and identity of a sandboxed program: `tools.<name>` in the config. Tools may add their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(10.0, gt=0, description="wall-clock time, then the process group is killed")
    cpu_s: int = Field(5, ge=1, description="CPU seconds (RLIMIT_CPU): SIGXCPU, then SIGKILL a second later")
    memory_mb: int = Field(256, ge=32, description="address space (RLIMIT_AS) of each process")
    file_size_mb: int = Field(16, ge=0, description="largest file a process may write (RLIMIT_FSIZE)")
    max_processes: int = Field(
        16, ge=1, description="processes and threads of the program's user (RLIMIT_NPROC); does not bind root"
    )
    max_open_files: int = Field(64, ge=8, description="open file descriptors per process (RLIMIT_NOFILE)")
    max_output_bytes: int = Field(1 * MIB, ge=1, description="stdout larger than this kills the program")
    max_stderr_bytes: int = Field(8192, ge=0, description="the tail of stderr kept for error messages")
    user: str = Field("nobody", min_length=1, description="the program's user when the service runs as root")
    python: Path | None = Field(None, description="interpreter for Python programs; default: the service's")
    tmp_dir: Path | None = Field(None, description="where working directories are made; default: TMPDIR, /tmp")
    env: dict[str, str] = Field(default_factory=dict, description="extra environment variables for the program")


@dataclass(frozen=True)
class Identity:
    """The unprivileged user a root service runs programs as."""

    name: str
    uid: int
    gid: int

    @classmethod
    def lookup(cls, user: str) -> Identity:
        try:
            entry = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, ValueError) as exc:
            raise ValueError(f"sandbox user {user!r} does not exist") from exc
        if entry.pw_uid == 0:
            raise ValueError(f"sandbox user {user!r} is root; programs must not run as root")
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _permits(path: Path, who: Identity, need: int) -> bool:
    """Whether `who` has the `need` bits (4 read, 2 write, 1 execute) on `path`, by its owner/group/other bits."""
    try:
        st = path.stat()
    except OSError:
        return False
    if st.st_uid == who.uid:
        bits = st.st_mode >> 6
    elif st.st_gid == who.gid:
        bits = st.st_mode >> 3
    else:
        bits = st.st_mode
    return bits & need == need


def usable_by(path: Path, who: Identity | None, *, execute: bool = False) -> bool:
    """Whether `who` (None: this process) can read (and execute) `path`, through every directory on the way."""
    need = 4 | (1 if execute else 0)
    if who is None:
        return os.access(path, os.R_OK | (os.X_OK if execute else 0))
    for candidate in {path.absolute(), path.resolve()}:
        if not all(_permits(folder, who, 1) for folder in candidate.parents):
            return False
    return _permits(path.resolve(), who, need)


def _become_subreaper() -> None:
    """Orphans of sandboxed programs become children of this process rather than of PID 1, so that `run` can reap
    them (an init that does not reap, or a container without one, would keep them as zombies that count against
    the sandbox user's process limit)."""
    if sys.platform != "linux":  # pragma: no cover - Linux only
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover - cannot fail on Linux ≥ 3.4
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _reap_group(pgid: int) -> None:
    """Wait for every child of this process still in group `pgid` (all were sent SIGKILL; they exit at once)."""
    while True:
        try:
            os.waitpid(-pgid, 0)
        except ChildProcessError:
            return
        except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for safety
            continue


async def _despite_cancel(cleanup: Coroutine[Any, Any, None]) -> None:
    """Run `cleanup` to its end even when the calling task is cancelled meanwhile, then re-raise that cancel.

    Cleanup after a first cancel must survive a second one: a tool timeout followed within milliseconds by the run
    being stopped, whose stream merge cancels the call again. Cut short, it would skip the reap and leave a zombie
    per call (this process is the programs' subreaper) and the pipes' descriptors open. `asyncio.wait` returns
    when the caller is cancelled without cancelling the cleanup task, which is always awaited to its end here.
    """
    task = asyncio.create_task(cleanup)
    cancelled: asyncio.CancelledError | None = None
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is None:
        task.result()
        return
    if not task.cancelled() and task.exception() is not None:  # the caller sees its cancel; the failure goes to logs
        log.error("sandbox cleanup failed after a cancel", exc_info=task.exception())
    raise cancelled


class _Overflow(Exception):
    pass


async def _read_capped(stream: asyncio.StreamReader, cap: int, on_overflow: Callable[[], None]) -> bytes:
    data = bytearray()
    while chunk := await stream.read(65536):
        data += chunk
        if len(data) > cap:
            on_overflow()
            raise _Overflow
    return bytes(data)


async def _read_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    tail = b""
    while chunk := await stream.read(65536):
        tail = (tail + chunk)[-keep:] if keep else b""
    return tail


async def _feed(stream: asyncio.StreamWriter, data: bytes) -> None:
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # the program need not read its input
        stream.write(data)
        await stream.drain()
        stream.close()
        await stream.wait_closed()


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Tells when the program itself has exited. `Process.wait()` cannot: on Python 3.11 it also waits until every
    process holding the program's stdout or stderr has closed them, so a lingering child would keep it waiting."""

    def __init__(self, limit: int, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=limit, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


@dataclass(frozen=True)
class _Finished:
    returncode: int
    stdout: bytes
    stderr: bytes
    overflow: bool


class Sandbox:
    """Runs one program (`argv`) per call under `options`. Built once per tool; `run` may be called concurrently."""

    _subreaper_done: ClassVar[bool] = False

    def __init__(self, argv: Sequence[str], options: SandboxOptions, *, name: str = "program") -> None:
        if not argv:
            raise ValueError("a sandboxed program needs an argv")
        self.name = name
        self.options = options
        self.identity = Identity.lookup(options.user) if os.geteuid() == 0 else None
        self._prlimit = shutil.which("prlimit", path=_SAFE_PATH)
        self._setpriv = shutil.which("setpriv", path=_SAFE_PATH)
        self.argv = list(argv)

    @classmethod
    def for_python(cls, script: Path, options: SandboxOptions, *, name: str = "program") -> Sandbox:
        """A sandbox for a Python script, run in isolated mode (`-I`: no user site, no PYTHON* variables, the
        script's folder not on sys.path) by an interpreter the sandbox user can run."""
        sandbox = cls([sys.executable], options, name=name)
        python = sandbox._interpreter()
        if not usable_by(script, sandbox.identity):
            raise ValueError(f"{name}: {script} is not readable by the sandbox user {options.user!r}")
        sandbox.argv = [python, "-I", str(script.resolve())]
        return sandbox

    def _interpreter(self) -> str:
        if self.options.python is not None:
            candidates = [self.options.python]
        else:
            # The service's own interpreter may sit where an unprivileged user cannot reach (e.g. under /root);
            # the program needs only the standard library, so the system's Python will do.
            system = shutil.which("python3", path=_SAFE_PATH)
            candidates = [Path(sys.executable), *([Path(system)] if system else [])]
        for candidate in candidates:
            if usable_by(candidate, self.identity, execute=True):
                return str(candidate)
        tried = ", ".join(map(str, candidates))
        raise ValueError(f"{self.name}: no Python interpreter the sandbox user {self.options.user!r} can run ({tried})")

    def _rlimits(self) -> list[tuple[str, int, int, int]]:
        """(prlimit option, resource, soft, hard) for every limit."""
        o = self.options
        return [
            ("--cpu", resource.RLIMIT_CPU, o.cpu_s, o.cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard
            ("--as", resource.RLIMIT_AS, o.memory_mb * MIB, o.memory_mb * MIB),
            ("--fsize", resource.RLIMIT_FSIZE, o.file_size_mb * MIB, o.file_size_mb * MIB),
            ("--nproc", resource.RLIMIT_NPROC, o.max_processes, o.max_processes),
            ("--nofile", resource.RLIMIT_NOFILE, o.max_open_files, o.max_open_files),
            ("--core", resource.RLIMIT_CORE, 0, 0),
        ]

    def command(self) -> tuple[list[str], dict[str, Any]]:
        """The argv to execute and extra arguments for the subprocess call.

        `setpriv` drops to the sandbox user (no supplementary groups, no_new_privs) and `prlimit` sets the limits,
        each then exec'ing the next, so this process only vfork()s and execs: no Python code and no
        pthread_atfork handler (gRPC installs some) runs in a forked copy of a threaded process. Without those
        util-linux commands the same is done by `user=`/`preexec_fn=`, which need a full fork().
        """
        limits = self._rlimits()
        argv, extra = list(self.argv), dict[str, Any]()
        if self._prlimit:
            argv = [self._prlimit, *(f"{opt}={soft}:{hard}" for opt, _, soft, hard in limits), "--", *argv]
        else:

            def set_limits() -> None:  # pragma: no cover - runs in the forked child
                for _, which, soft, hard in limits:
                    resource.setrlimit(which, (soft, hard))

            extra["preexec_fn"] = set_limits
        who = self.identity
        if self._setpriv:
            drop = [f"--reuid={who.uid}", f"--regid={who.gid}", "--clear-groups"] if who else []
            argv = [self._setpriv, *drop, "--no-new-privs", "--", *argv]
        elif who:
            extra.update(user=who.uid, group=who.gid, extra_groups=[])
        return argv, extra

    def environment(self, workdir: Path) -> dict[str, str]:
        return {
            "PATH": _SAFE_PATH,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
            "HOME": str(workdir),
            "TMPDIR": str(workdir),
            **self.options.env,
        }

    async def run(self, payload: JSON, *, files: Mapping[str, Path] | None = None) -> JSON:
        """Run the program with `payload` on stdin and return the JSON it printed; `files` (name → source) are
        copied read-only into its working directory first. Failures raise `ToolError`."""
        data = json.dumps(payload).encode()
        if not Sandbox._subreaper_done:
            _become_subreaper()
            Sandbox._subreaper_done = True
        folder = tempfile.TemporaryDirectory(prefix="sandbox-", dir=self.options.tmp_dir, ignore_cleanup_errors=True)
        try:
            workdir = Path(folder.name)
            await asyncio.to_thread(self._prepare, workdir, files or {})
            finished = await self._execute(workdir, data)
        finally:
            # Off the event loop: a runaway program can leave so many files that deleting them takes seconds.
            await _despite_cancel(asyncio.to_thread(folder.cleanup))
        return self._result(finished)

    def _prepare(self, workdir: Path, files: Mapping[str, Path]) -> None:
        for name, source in files.items():
            if Path(name).name != name or name in {"", ".", ".."}:
                raise ValueError(f"staged file names are plain names, not {name!r}")
            target = workdir / name
            shutil.copyfile(source, target)
            target.chmod(0o444)
        if self.identity is not None:
            os.chown(workdir, self.identity.uid, self.identity.gid)
        workdir.chmod(0o700)

    async def _execute(self, workdir: Path, data: bytes) -> _Finished:
        argv, extra = self.command()
        loop = asyncio.get_running_loop()
        transport, protocol = await loop.subprocess_exec(
            lambda: _Protocol(limit=65536, loop=loop),
            *argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=workdir,
            env=self.environment(workdir),
            start_new_session=True,  # its own session and process group: pgid == pid
            close_fds=True,
            **extra,
        )
        proc = asyncio.subprocess.Process(transport, protocol, loop)
        pgid = proc.pid
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        overflow = False

        def kill_on_overflow() -> None:
            nonlocal overflow
            overflow = True
            _kill_group(pgid)

        tasks = [
            asyncio.create_task(_read_capped(proc.stdout, self.options.max_output_bytes, kill_on_overflow)),
            asyncio.create_task(_read_tail(proc.stderr, self.options.max_stderr_bytes)),
            asyncio.create_task(_feed(proc.stdin, data)),
        ]
        try:
            async with asyncio.timeout(self.options.timeout_s):
                await protocol.exited.wait()
                _kill_group(pgid)  # whatever the program left behind; its pipes close with it
                stdout, stderr, _ = await asyncio.gather(*tasks, return_exceptions=True)
        except TimeoutError:
            raise ToolError(f"{self.name} ran longer than {self.options.timeout_s:g} s and was stopped") from None
        finally:
            _kill_group(pgid)
            for task in tasks:
                task.cancel()

            async def clean_up() -> None:
                await asyncio.gather(*tasks, return_exceptions=True)
                await protocol.exited.wait()
                await asyncio.to_thread(_reap_group, pgid)
                # Our ends of the pipes are closed here. asyncio closes them by itself only once each has reported
                # end of file: some loop turns later, or never when output was left unread (past the output cap the
                # reader stops; what the program wrote meanwhile fills the stream's buffer and pauses the pipe) or a
                # descendant that left the group (setsid) still holds them. Until then their descriptors stay open.
                transport.close()
                await asyncio.sleep(0)  # the pipes close their descriptors in callbacks close() queued: let them run

            await _despite_cancel(clean_up())
        assert proc.returncode is not None  # set when the program exited (`protocol.exited`)
        returncode = proc.returncode
        return _Finished(
            returncode=returncode,
            stdout=stdout if isinstance(stdout, bytes) else b"",
            stderr=stderr if isinstance(stderr, bytes) else b"",
            overflow=overflow or isinstance(stdout, _Overflow),
        )

    def _result(self, finished: _Finished) -> JSON:
        o = self.options
        if finished.overflow:
            raise ToolError(f"{self.name} wrote more than {o.max_output_bytes} bytes of output and was stopped")
        code = finished.returncode
        tail = finished.stderr.decode(errors="replace").strip()
        last = tail.splitlines()[-1] if tail else ""
        if code < 0:
            reasons = {
                int(signal.SIGXCPU): f"used more than {o.cpu_s} s of CPU time",
                int(signal.SIGXFSZ): f"wrote a file larger than {o.file_size_mb} MiB",
                int(signal.SIGKILL): f"was killed (CPU limit {o.cpu_s} s, or memory limit {o.memory_mb} MiB)",
            }
            raise ToolError(f"{self.name} {reasons.get(-code, f'died of signal {-code}')}")
        if code != 0:
            if "MemoryError" in tail:
                raise ToolError(f"{self.name} ran out of memory (limit {o.memory_mb} MiB)")
            raise ToolError(f"{self.name} failed (exit status {code}): {last or 'no message'}")
        if not finished.stdout.strip():
            raise ToolError(f"{self.name} printed no result")
        try:
            return json.loads(finished.stdout)
        except ValueError as exc:
            raise ToolError(f"{self.name} printed invalid JSON ({exc}); stderr: {last or 'empty'}") from exc


class SandboxedTool(Tool[InputT]):
    """A tool whose work is a Python program (`program`) run in a `Sandbox` with the limits of `tools.<name>`.

    Subclasses set `name`, `description`, `Input` and `program`; they may widen `Options` (a `SandboxOptions`
    subclass) and override `prepare` to add to the payload or stage files, and `result` to shape the answer.
    """

    program: ClassVar[Path]
    Options: ClassVar[type[SandboxOptions]] = SandboxOptions

    def __init__(self, config: ToolConfig) -> None:
        self.config = config
        self.options = self.Options.model_validate(dict(config.options))
        self.sandbox = Sandbox.for_python(self.program, self.options, name=self.name)

    async def prepare(self, args: InputT) -> tuple[JSON, Mapping[str, Path]]:
        """The program's input and the files (name → source) staged in its working directory."""
        return args.model_dump(mode="json"), {}

    def result(self, output: JSON) -> JSON:
        return output

    async def run(self, args: InputT) -> JSON:
        payload, files = await self.prepare(args)
        return self.result(await self.sandbox.run(payload, files=files))


__all__ = ["Identity", "Sandbox", "SandboxOptions", "SandboxedTool", "usable_by"]
