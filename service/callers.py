"""Callers and their limits: who a call is from (set once per call by the transport's authentication), what that
caller may use, and how many runs it may start. Nothing here knows how a caller proved who it is.

The caller of the current call travels in a context variable: the transport's check and the handler it guards run
in the same task.
"""

from __future__ import annotations

import contextvars
import hashlib
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TextIO

from service.config import CallerConfig


@dataclass(frozen=True)
class Caller:
    name: str
    config: CallerConfig
    via: str  # "mtls", "token" or "none"

    def may_use(self, tool: str) -> bool:
        return self.config.tools is None or tool in self.config.tools

    @property
    def limited(self) -> bool:
        """Whether `CallerLimits` bounds this caller's runs: a caller with neither limit is not counted."""
        return self.config.max_concurrent_runs is not None or self.config.runs_per_minute is not None


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)
CALLER = _current  # read directly where a call's cost counts (`auth.AuthInterceptor`): no function call


def current_caller(default: Caller | None = None) -> Caller | None:
    return _current.get() or default


def bind_caller(caller: Caller) -> None:
    """Make `caller` the caller of the current call (its task and what that task starts)."""
    _current.set(caller)


@dataclass
class CallerLimits:
    """Per-caller runs per minute (a sliding window) and concurrent runs. In-process: with several replicas the
    limits apply per replica until they move to a shared store.

    `admit` only checks; `started` counts a run once it exists, so a run refused after the check (the background
    queue is full, say) uses up none of the caller's runs per minute. The servicer calls both in one synchronous
    step, with no await between them, so no other start of the same caller can pass the check in between."""

    clock: Callable[[], float] = time.monotonic
    _starts: dict[str, deque[float]] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    def admit(self, caller: Caller) -> str | None:
        """None when the caller may start a run now, else the reason it may not. Records nothing."""
        limit = caller.config.max_concurrent_runs
        if limit is not None and self.active.get(caller.name, 0) >= limit:
            return f"caller {caller.name} has {limit} runs in progress, its limit; wait for one to end"
        per_minute = caller.config.runs_per_minute
        if per_minute is not None:
            starts = self._last_minute(caller.name)
            if len(starts) >= per_minute:
                wait = math.ceil(60 - (self.clock() - starts[0]))  # rounded up: a retry on time is let in
                return (
                    f"caller {caller.name} started {per_minute} runs in the last minute, its limit; retry in {wait} s"
                )
        return None

    def started(self, caller: Caller) -> None:
        """A run of this caller was created (after `admit` let it through)."""
        self.active[caller.name] = self.active.get(caller.name, 0) + 1
        if caller.config.runs_per_minute is not None:
            self._last_minute(caller.name).append(self.clock())

    def ended(self, caller: Caller) -> None:
        self.ended_named(caller.name)

    def resumed(self, name: str) -> None:
        """A run of this caller resumed after a restart: in progress again (its start was counted before)."""
        self.active[name] = self.active.get(name, 0) + 1

    def ended_named(self, name: str) -> None:
        self.active[name] = max(0, self.active.get(name, 0) - 1)

    def _last_minute(self, name: str) -> deque[float]:
        """The caller's starts of the last 60 s (older ones are dropped here)."""
        now = self.clock()
        starts = self._starts.setdefault(name, deque())
        while starts and now - starts[0] >= 60:
            starts.popleft()
        return starts


def token_hash(token: str) -> str:
    """What goes in `token_sha256` for a token (`python -m service.auth < token-file` prints it)."""
    return hashlib.sha256(token.encode()).hexdigest()


def main(argv: Sequence[str], stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """`python -m service.auth`: the hash of each token read from stdin, one a line. Never from arguments, which
    every user of the machine sees in `ps` and the shell keeps in its history."""
    if argv:
        print(
            "usage: python -m service.auth < token-file  (tokens on stdin, one a line; not as arguments, which "
            "other users see in ps and the shell keeps in its history)",
            file=stderr,
        )
        return 2
    for line in stdin:
        token = line.strip()  # as the server strips the header's token
        if token:
            print(token_hash(token), file=stdout)
    return 0
