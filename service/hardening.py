"""What the service process does to itself at start so that the programs it runs (sandboxed tools) cannot reach
into it, and so that none of its children is left a zombie. See docs/security.md, "Sandboxed tools"."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import sys

from tools._children import OrphanReaper, become_subreaper

log = logging.getLogger(__name__)

_PR_SET_DUMPABLE = 4
REAP_PERIOD_S = 1.0  # with the reaper's 1 s grace, an orphan is reaped within about 2 s


def make_undumpable() -> None:
    """No process of this user but a privileged one (CAP_SYS_PTRACE) may read this process's memory or environment
    (`/proc/PID/environ`, `mem`, `maps`, ptrace): with the service not root, a sandboxed program runs as its user,
    and the environment holds ANTHROPIC_API_KEY. It also means no core dump, and debugging the live process (py-spy,
    gdb) needs root. The process itself can no longer open its own `/proc/self/environ` or `io` (they become root's),
    which nothing in the service reads."""
    if sys.platform != "linux":  # pragma: no cover - Linux only
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:  # pragma: no cover - cannot fail with a valid argument
        log.warning("cannot make the process undumpable: %s", os.strerror(ctypes.get_errno()))


def reap_orphans(period_s: float = REAP_PERIOD_S) -> asyncio.Task[None]:
    """Become the subreaper of everything this process starts and reap, every `period_s`, the orphans nobody waits
    for (`tools/_children.py` says which, and why not `waitpid(-1)`). Cancel the task to stop."""
    become_subreaper()
    return asyncio.create_task(OrphanReaper().run(period_s), name="orphan-reaper")
