"""The sandbox's launcher: one per call, between the service and the program. The service runs this file's text as
`python -I -S -c SOURCE SPEC` (it need not be readable by the sandbox user: the text travels in argv), so no Python
and no fork handler runs in a forked copy of the threaded service; this single-threaded process forks instead.

The launcher makes itself the child subreaper of the call, forks the program, and in the child sets the limits,
drops to the sandbox user, sets no_new_privs and the Landlock rules, then execs the program. Every process the
program starts, even one that left the process group with setsid() and whose parent has exited, is re-parented
to the launcher, never to the service. When the program exits, or the service sends SIGTERM (timeout, cancel,
output cap), or the service dies (parent-death signal), the launcher kills every process below it with SIGKILL,
reaps them all, and exits as the program did (its exit status, or the same signal).

Standard library only (this runs with -S: no site-packages), and few modules of it, since each import is paid by
every call: json, contextlib, typing and signal's enums took a bare start of ~15 ms to ~40 ms here. The spec comes
as `marshal` data (built in; its format 4 reads alike in every Python 3). The service imports this module for
`landlock_abi()` and the constants.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import resource
import sys
import time

TYPE_CHECKING = False  # not typing's: its import alone costs every call milliseconds
if TYPE_CHECKING:
    import signal
    from typing import Any
else:
    import _signal as signal  # the same functions and numbers, without signal.py's enums (and enum's import)

PR_SET_PDEATHSIG = 1
PR_SET_NO_NEW_PRIVS = 38
PR_SET_CHILD_SUBREAPER = 36

# Landlock (linux/landlock.h). The system call numbers are the same on every architecture.
SYS_CREATE_RULESET, SYS_ADD_RULE, SYS_RESTRICT_SELF = 444, 445, 446
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH = 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_ABI1 = (1 << 13) - 1  # execute … make_sym: every right of ABI 1
FS_REFER, FS_TRUNCATE, FS_IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
FS_FILE_ONLY = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # the rights a file can hold
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1

STOPPED = 125  # the exit status when the service stopped the call (it knows why)
SETUP_FAILED = 126  # the program could not be started as asked; its stderr says why

# SIGTERM: the service ends the call; SIGHUP: the service died (parent-death signal); SIGCHLD: a child exited.
_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


class _PathBeneathAttr(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


def _prctl(option: int, value: int) -> None:
    if _libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl({option}): {os.strerror(err)}")


def landlock_abi() -> int:
    """The kernel's Landlock ABI version; 0 where there is none (old kernel, not enabled, or blocked by seccomp)."""
    if not sys.platform.startswith("linux"):
        return 0
    version = _libc.syscall(
        ctypes.c_long(SYS_CREATE_RULESET), None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION)
    )
    return max(int(version), 0)


def _restrict(abi: int, read: list[str], write: list[str], devices: list[str], tcp: bool) -> None:
    """From here on (and across execve, for every descendant) the file system is reachable only under `read`
    (read and execute) and `write` (everything), TCP not at all unless `tcp`, and, from ABI 6, signals and abstract
    Unix sockets reach no process outside this domain (the launcher and the service among them)."""
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0) | (FS_IOCTL_DEV if abi >= 5 else 0)
    net = 0 if tcp or abi < 4 else NET_BIND_TCP | NET_CONNECT_TCP
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = _RulesetAttr(fs, net, scoped)
    size = 8 if abi < 4 else 16 if abi < 6 else 24  # a kernel refuses fields it does not know
    ruleset = _libc.syscall(
        ctypes.c_long(SYS_CREATE_RULESET), ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0)
    )
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    reading = FS_EXECUTE | FS_READ_FILE | FS_READ_DIR
    device = FS_READ_FILE | FS_WRITE_FILE | (FS_IOCTL_DEV if abi >= 5 else 0)
    for paths, access in ((read, reading), (write, fs), (devices, device)):
        for path in paths:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:  # missing, or not reachable by this user: nothing to allow
                continue
            allowed = access if os.path.isdir(path) else access & FS_FILE_ONLY
            rule = _PathBeneathAttr(allowed & fs, fd)
            done = _libc.syscall(
                ctypes.c_long(SYS_ADD_RULE),
                ctypes.c_int(ruleset),
                ctypes.c_int(RULE_PATH_BENEATH),
                ctypes.byref(rule),
                ctypes.c_uint32(0),
            )
            os.close(fd)
            if done != 0:
                raise OSError(ctypes.get_errno(), f"landlock_add_rule {path}")
    if _libc.syscall(ctypes.c_long(SYS_RESTRICT_SELF), ctypes.c_int(ruleset), ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), "landlock_restrict_self")
    os.close(ruleset)


def _become_program(spec: dict[str, Any], launcher: int) -> None:
    """In the forked child: limits, user, no_new_privs, Landlock, then exec. Never returns."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)  # Python ignores SIGPIPE and SIGXFSZ; ignored signals survive exec
    for name, soft, hard in spec["limits"]:
        resource.setrlimit(getattr(resource, f"RLIMIT_{name}"), (soft, hard))
    if spec["uid"] is not None:
        os.setgroups([])
        os.setresgid(spec["gid"], spec["gid"], spec["gid"])
        os.setresuid(spec["uid"], spec["uid"], spec["uid"])
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after the user change, which clears it
    if os.getppid() != launcher:  # the launcher died before that: do not run unsupervised
        os._exit(SETUP_FAILED)
    _prctl(PR_SET_NO_NEW_PRIVS, 1)
    landlock = spec["landlock"]
    if landlock is not None:
        try:
            _restrict(landlock["abi"], landlock["read"], landlock["write"], landlock["devices"], landlock["tcp"])
        except OSError as exc:
            raise OSError(exc.errno, f"cannot restrict the program's file system (Landlock): {exc}") from None
    argv = spec["argv"]
    os.execve(argv[0], argv, os.environ)


def children(pid: int) -> list[int]:
    """The children of `pid`, from /proc/PID/task/TID/children; a full /proc scan where the kernel lacks that file."""
    found: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found += [int(child) for child in f.read().split()]
        except FileNotFoundError:
            return _children_by_scan(pid)
        except OSError:
            continue
    return found


def _children_by_scan(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


def _descendants() -> list[int]:
    found, todo = [], children(os.getpid())
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children(pid)
    return found


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:  # gone meanwhile
        return


def end_all() -> None:
    """SIGKILL every process below this one and reap them all. A process re-parented here while this runs (its
    parent was just killed) is found on the next pass; it ends when no child is left."""
    while True:
        for pid in _descendants():
            _kill(pid)
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        time.sleep(0.001)  # the killed ones are exiting


def _exit_as(status: int | None) -> None:
    if status is None:
        os._exit(STOPPED)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
        os.kill(os.getpid(), sig)  # RLIMIT_CORE is 0: no core file
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128)


def _wait_for(program: int) -> int | None:
    """The program's wait status, or None when the service stopped the call or went away first. Signals are taken
    synchronously (blocked, then sigwaitinfo), so none can interrupt the clean-up halfway through."""
    while True:
        try:
            while True:
                pid, status = os.waitpid(-1, os.WNOHANG)  # orphans re-parented here are reaped as they exit
                if pid == 0:
                    break
                if pid == program:
                    return status
        except ChildProcessError:  # pragma: no cover - the program is a child until it is reaped above
            return None
        if signal.sigwaitinfo(_SIGNALS).si_signo != signal.SIGCHLD:
            return None


def main(spec: dict[str, Any]) -> None:
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGHUP)
    if os.getppid() != spec["parent"]:  # the service died before the parent-death signal was set
        os._exit(STOPPED)
    launcher = os.getpid()
    program = os.fork()
    if program == 0:
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, set())  # a blocked signal stays blocked across exec
            _become_program(spec, launcher)
        except BaseException as exc:
            os.write(2, f"sandbox: {exc}\n".encode(errors="replace"))
        os._exit(SETUP_FAILED)
    # The program's stdin, stdout and stderr are the service's pipes: holding them here would keep them open.
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    status = _wait_for(program)
    end_all()
    _exit_as(status)


if __name__ == "__main__":
    main(marshal.loads(bytes.fromhex(sys.argv[1])))
