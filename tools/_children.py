"""The service process's children: the sandbox's launchers, which asyncio waits for, and orphans the kernel hands
to the service (it is their subreaper, or PID 1 in a container), which nobody waits for unless this module does.

Each sandboxed call has its own launcher (`tools/_launcher.py`) that reaps everything below it, so orphans reach
the service only when a launcher itself was killed first, or, as a container's PID 1, from anything in the
container (a `kubectl exec` shell's leftovers).

Why not `waitpid(-1, WNOHANG)`: it would also take the exit status of a child asyncio's child watcher waits for
(on Python 3.11 a thread blocked in `waitpid(pid)`, later a pidfd read on the loop); the watcher would then report
returncode 255 and log "Unknown child process pid", and the sandbox would read a failed call. So `OrphanReaper`
waits, by pid, only for children that (1) are zombies, (2) are not a launcher still running (`track`ed from its
spawn until asyncio reported its exit), and (3) have been zombies, with the same start time, for `grace_s` (1 s):
a watcher reaps its child the moment it exits, so a zombie that stays one that long has nobody waiting for it.
Rule (3) also covers the moment between a spawn and its `track`. Code that starts a child process in the service
must wait for it promptly, as asyncio does.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import sys
import time
from collections.abc import Callable

from tools._launcher import PR_SET_CHILD_SUBREAPER, children

log = logging.getLogger(__name__)

_running: set[int] = set()  # pids of launchers not yet reaped by asyncio (module-wide, as children are)


def track(pid: int) -> None:
    _running.add(pid)


def untrack(pid: int) -> None:
    _running.discard(pid)


def become_subreaper() -> None:
    """Orphans below this process come to it rather than to PID 1, so that `OrphanReaper` reaps them (an init
    that does not reap, or a container whose PID 1 is a shell, would keep them as zombies)."""
    if sys.platform != "linux":  # pragma: no cover - Linux only
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:  # pragma: no cover - cannot fail on Linux ≥ 3.4
        log.warning("cannot become a child subreaper: %s", os.strerror(ctypes.get_errno()))


def _zombie_start_time(pid: int) -> int | None:
    """The start time of child `pid` if it is a zombie, else None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
    except OSError:
        return None
    return int(fields[19]) if fields[0] == "Z" else None


class OrphanReaper:
    """Waits for the zombie children nobody else waits for (see the module's docstring for the rules)."""

    def __init__(self, *, grace_s: float = 1.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._since: dict[tuple[int, int], float] = {}  # (pid, start time) of each zombie → when first seen

    def sweep(self) -> list[int]:
        """Reap the orphans found; return their pids."""
        now = self._clock()
        zombies = []
        for pid in children(os.getpid()):
            started = _zombie_start_time(pid)
            if started is not None and pid not in _running:
                zombies.append((pid, started))
        self._since = {zombie: self._since.get(zombie, now) for zombie in zombies}
        reaped = []
        for (pid, started), since in list(self._since.items()):
            if now - since >= self.grace_s:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        reaped.append(pid)
                        del self._since[pid, started]
        if reaped:
            log.info("reaped orphaned processes", extra={"pids": sorted(reaped)})
        return reaped

    async def run(self, period_s: float) -> None:
        """Sweep every `period_s` until cancelled. On the event loop: a sweep reads a few small /proc files."""
        while True:
            self.sweep()
            await asyncio.sleep(period_s)


__all__ = ["OrphanReaper", "become_subreaper", "track", "untrack"]
