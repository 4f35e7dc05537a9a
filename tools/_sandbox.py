"""Sandboxed tools: a registered program run in a subprocess, its input as JSON on stdin, its result as JSON on
stdout, under time, CPU, memory, file-size, process-count and output limits, as another user when the service is
root, and (with Landlock) with the file system, TCP and signals fenced off. docs/security.md says exactly what this
contains and what it does not.

The containment contract of `Sandbox.run`, whatever happens (normal end, timeout, output overflow, a failure of
the service, or cancellation of the calling task):

- every call has its own launcher (`tools/_launcher.py`), the subreaper of everything the program starts; when
  the program exits or the call ends, the launcher kills every process below it (also those that left the
  process group with setsid()) and reaps them, and `run` returns or raises only once the launcher has exited,
  even when cancelled again during that cleanup (`CancelledError` is re-raised after it, never swallowed);
- the service only vfork()s and execs the launcher, a fresh single-threaded Python: no Python code and no
  pthread_atfork handler (gRPC installs some) runs in a forked copy of the threaded service;
- when the service runs as root, the program runs as `user` (default `nobody`) with no supplementary groups:
  the process-count limit does not bind root; `no_new_privs` is set, so no setuid binary gains privileges;
- with Landlock (Linux ≥ 5.13) the program reads only the system's and its interpreter's folders, writes only in
  its working directory, and (by kernel version) opens no TCP connection and signals no process outside its call;
- the environment holds only PATH, LANG, LC_ALL, HOME and TMPDIR (plus `env` from the options): no secret of
  the service (API keys, tokens) reaches the program;
- the working directory is a fresh temporary directory (the program's HOME and TMPDIR too), removed afterwards;
  the program's own file is copied there from memory at each call, so the service's folder need not be readable
  by the sandbox user (a clone in a mode-700 home works).

A sandbox that cannot work here (no such user, no interpreter or working folder the user can reach) raises
`SandboxUnavailable`; `SandboxedTool` then marks its tool unavailable rather than stopping the service.

The module name starts with an underscore so that `tools.load_tools` does not take it for a tool.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import marshal
import os
import pwd
import shutil
import signal
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field

from tools._launcher import SETUP_FAILED, landlock_abi
from tools._sandbox_call import Finished, despite_cancel, run_launcher
from tools.base import JSON, InputT, Tool, ToolConfig, ToolError

log = logging.getLogger(__name__)

MIB = 1024 * 1024
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
# The launcher's text, read by the service (the sandbox user need not read the service's files): it goes in argv.
_LAUNCHER = (Path(__file__).parent / "_launcher.py").read_text()
# What any program may read and execute under Landlock: the system's programs and libraries, the dynamic linker's
# cache, the time zone. Not /etc as a whole (configs, mounted secrets), not /home, /root, /tmp, /var or /proc.
_SYSTEM_READ = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc/ld.so.cache", "/etc/localtime")
_DEVICES = ("/dev/null", "/dev/zero", "/dev/random", "/dev/urandom")


class SandboxOptions(BaseModel):
    """Limits and identity of a sandboxed program: `tools.<name>` in the config. Tools may add their own fields."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float = Field(10.0, gt=0, description="wall-clock time, then every process of the call is killed")
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
    read_paths: list[Path] = Field(
        default_factory=list, description="more files or folders the program may read (Landlock), beyond the system's"
    )
    write_paths: list[Path] = Field(
        default_factory=list, description="files or folders the program may also write (Landlock), beyond its own"
    )
    tcp: bool = Field(False, description="allow TCP connections and listening (Landlock, Linux ≥ 6.7)")


class SandboxUnavailable(ValueError):
    """The sandbox cannot run programs here: the message says what is missing."""


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


@functools.cache
def _landlock() -> int:
    """The kernel's Landlock ABI, probed once per process; says so in the log once when there is none."""
    abi = landlock_abi()
    if abi == 0:
        log.warning(
            "Landlock is not available (kernel before 5.13, not enabled, or refused by a seccomp profile): "
            "sandboxed programs can read and write what their user can, open network connections and signal the "
            "service's other processes of their user (see docs/security.md)"
        )
    return abi


def _interpreter_folders(python: str) -> list[str]:
    """What the interpreter needs to start: its prefix (bin/.. of the real binary: the standard library) and, for
    a virtual environment, the environment (pyvenv.cfg, site-packages)."""
    folders = [Path(os.path.realpath(python)).parent.parent]
    if (Path(python).parent.parent / "pyvenv.cfg").is_file():
        folders.append(Path(python).absolute().parent.parent)
    return [str(folder) for folder in folders if folder != Path("/")]


class Sandbox:
    """Runs one program (`argv`) per call under `options`. Built once per tool; `run` may be called concurrently.

    `staged` (name → content) are files written into each call's working directory before the program starts (a
    Python program's own file among them). Raises `SandboxUnavailable` when programs cannot run here as asked.
    """

    def __init__(
        self,
        argv: Sequence[str],
        options: SandboxOptions,
        *,
        name: str = "program",
        staged: Mapping[str, bytes] | None = None,
    ) -> None:
        if not argv:
            raise ValueError("a sandboxed program needs an argv")
        self.name = name
        self.options = options
        self.argv = list(argv)
        self.staged = dict(staged or {})
        try:
            self.identity = Identity.lookup(options.user) if os.geteuid() == 0 else None
        except ValueError as exc:
            raise SandboxUnavailable(str(exc)) from exc
        self.python = self._interpreter()
        folder = Path(options.tmp_dir or tempfile.gettempdir())
        if not (folder.is_dir() and usable_by(folder, self.identity, execute=True)):
            raise SandboxUnavailable(f"the sandbox user {options.user!r} cannot reach the working folder {folder}")
        self.landlock_abi = _landlock()

    @classmethod
    def for_python(cls, script: Path, options: SandboxOptions, *, name: str = "program") -> Sandbox:
        """A sandbox for a Python script, run in isolated mode (`-I`: no user site, no PYTHON* variables, the
        script's folder not on sys.path) by an interpreter the sandbox user can run. The script is read now and
        copied into each call's working directory: one file of a few KiB, and its folder (a private clone, a
        mode-700 home) need not be readable by the sandbox user nor be allowed by the Landlock rules."""
        sandbox = cls([sys.executable], options, name=name, staged={script.name: script.read_bytes()})
        sandbox.argv = [sandbox.python, "-I", script.name]  # the interpreter chosen for the sandbox user
        return sandbox

    def _interpreter(self) -> str:
        if self.options.python is not None:
            candidates = [self.options.python]
        else:
            # The service's own interpreter may sit where an unprivileged user cannot reach (e.g. under /root);
            # the launcher and the programs need only the standard library, so the system's Python will do.
            system = shutil.which("python3", path=_SAFE_PATH)
            candidates = [Path(sys.executable), *([Path(system)] if system else [])]
        for candidate in candidates:
            if usable_by(candidate, self.identity, execute=True):
                return str(candidate)
        tried = ", ".join(map(str, candidates))
        raise SandboxUnavailable(f"no Python interpreter the sandbox user {self.options.user!r} can run ({tried})")

    def _limits(self) -> list[tuple[str, int, int]]:
        """(resource, soft, hard) for every limit, as the launcher sets them."""
        o = self.options
        return [
            ("CPU", o.cpu_s, o.cpu_s + 1),  # SIGXCPU at the soft limit, SIGKILL at the hard
            ("AS", o.memory_mb * MIB, o.memory_mb * MIB),
            ("FSIZE", o.file_size_mb * MIB, o.file_size_mb * MIB),
            ("NPROC", o.max_processes, o.max_processes),
            ("NOFILE", o.max_open_files, o.max_open_files),
            ("CORE", 0, 0),
        ]

    def command(self, workdir: Path) -> list[str]:
        """The launcher's argv for a call working in `workdir`: its text, and what it is to do as `marshal` data."""
        o, who, abi = self.options, self.identity, self.landlock_abi
        landlock = None
        if abi:
            programs = [str(Path(a).resolve()) for a in self.argv[:1] if os.path.isabs(a)]
            read = [*_SYSTEM_READ, *_interpreter_folders(self.python), *programs, *map(str, o.read_paths)]
            write = [str(workdir), *map(str, o.write_paths)]
            landlock = {"abi": abi, "read": read, "write": write, "devices": list(_DEVICES), "tcp": o.tcp}
        spec = {
            "parent": os.getpid(),
            "argv": self.argv,
            "limits": self._limits(),
            "uid": who.uid if who else None,
            "gid": who.gid if who else None,
            "landlock": landlock,
        }
        return [self.python, "-I", "-S", "-c", _LAUNCHER, marshal.dumps(spec, 4).hex()]

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
        data, o = json.dumps(payload).encode(), self.options
        folder = tempfile.TemporaryDirectory(prefix="sandbox-", dir=o.tmp_dir, ignore_cleanup_errors=True)
        try:
            workdir = Path(folder.name)
            await asyncio.to_thread(self._prepare, workdir, files or {})
            try:
                finished = await run_launcher(self.command(workdir), workdir, self.environment(workdir), data, o)
            except TimeoutError:
                raise ToolError(f"{self.name} ran longer than {o.timeout_s:g} s and was stopped") from None
        finally:
            # Off the event loop: a runaway program can leave so many files that deleting them takes seconds.
            await despite_cancel(asyncio.to_thread(folder.cleanup))
        return self._result(finished)

    def _prepare(self, workdir: Path, files: Mapping[str, Path]) -> None:
        if set(files) & set(self.staged):
            raise ValueError(f"staged file names clash with the program's: {', '.join(set(files) & set(self.staged))}")
        for name in [*files, *self.staged]:
            if Path(name).name != name or name in {"", ".", ".."}:
                raise ValueError(f"staged file names are plain names, not {name!r}")
        for name, source in files.items():
            shutil.copyfile(source, workdir / name)
        for name, content in self.staged.items():
            (workdir / name).write_bytes(content)
        for name in [*files, *self.staged]:
            (workdir / name).chmod(0o444)
        if self.identity is not None:
            os.chown(workdir, self.identity.uid, self.identity.gid)
        workdir.chmod(0o700)

    def _result(self, finished: Finished) -> JSON:
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
        if code == SETUP_FAILED and last.startswith("sandbox: "):
            raise ToolError(f"{self.name} could not be started in the sandbox: {last.removeprefix('sandbox: ')}")
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
    Where the sandbox cannot work (`SandboxUnavailable`), the tool is built `unavailable` with the reason.
    """

    program: ClassVar[Path]
    Options: ClassVar[type[SandboxOptions]] = SandboxOptions

    def __init__(self, config: ToolConfig) -> None:
        self.config = config
        self.options = self.Options.model_validate(dict(config.options))
        self.sandbox: Sandbox | None = None
        try:
            self.sandbox = Sandbox.for_python(self.program, self.options, name=self.name)
        except SandboxUnavailable as exc:
            self.unavailable = str(exc)

    async def prepare(self, args: InputT) -> tuple[JSON, Mapping[str, Path]]:
        """The program's input and the files (name → source) staged in its working directory."""
        return args.model_dump(mode="json"), {}

    def result(self, output: JSON) -> JSON:
        return output

    async def run(self, args: InputT) -> JSON:
        if self.sandbox is None:
            raise ToolError(f"{self.name} is unavailable on this server: {self.unavailable}")
        payload, files = await self.prepare(args)
        return self.result(await self.sandbox.run(payload, files=files))


__all__ = ["Identity", "Sandbox", "SandboxOptions", "SandboxUnavailable", "SandboxedTool", "usable_by"]
