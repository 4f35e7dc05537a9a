"""One run: its state and its event log, with gapless seqs, which any number of subscribers follow from any seq.

A subscriber reads the log through a cursor, so a slow one costs no memory and never slows the run: while it is
behind, consecutive text deltas are merged for it, and past `max_lag` events it is dropped (`SubscriberTooSlow`) and
resumes from the log with its last seq.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import AsyncIterator, Iterable
from dataclasses import replace
from typing import NamedTuple

from service import events as ev
from service.coalesce import DELTAS
from service.control import RunControl
from service.errors import AgentError, RunHandedOver, SubscriberTooSlow
from service.loop import RunSpec

# What an event costs the log besides its text and data: the entry, the event object, the timestamp.
EVENT_BYTES = 200
_CLOSING = (ev.FinalResponse, ev.RunFailed)  # a run's last event


class RunState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


# Looked up once: reading an enum's member off its class costs about 1,000 instructions.
_QUEUED, _SUCCEEDED, _FAILED, _CANCELLED = RunState.QUEUED, RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED


class RunRecord(NamedTuple):
    """What a store knows of a run without reading its log: enough for `GetRun`."""

    run_id: str
    caller: str
    state: str  # a RunState value
    last_seq: int
    created_ns: int
    ended_ns: int
    outcome: ev.FinalResponse | ev.RunFailed | None
    fingerprint: str = ""
    owner: str = ""  # the instance id of the process that drives it
    queue_position: int = 0  # a run waiting in the fleet's durable queue: its place (1: next); else 0

    @property
    def finished(self) -> bool:
        return self.state in ("succeeded", "failed", "cancelled")


class Entry(NamedTuple):
    """A logged event. `first_seq` is set on a delivery that merges several deltas (seqs first_seq..seq). A named
    tuple rather than a frozen dataclass: one is made per event, and this is three times cheaper to make."""

    seq: int
    time_ns: int
    event: ev.Event
    first_seq: int = 0


# `Entry(seq, time_ns, event)` without the named tuple's `__new__`, a Python function: 1,400 instructions less an event
_entry = tuple.__new__


def driving(runs: Iterable[Run]) -> list[asyncio.Task[None]]:
    """The driver tasks of `runs` still going (an ended run's `task` is a finished future, not its task)."""
    return [r.task for r in runs if isinstance(r.task, asyncio.Task) and not r.task.done()]


class Run:
    ahead = 0  # how far its streams may run past its kept log (`state.mirror.SharedRun`); see `resume_after`

    def __init__(self, spec: RunSpec, control: RunControl, *, caller: str, key: str, fingerprint: str) -> None:
        self.id = spec.run_id
        self.spec = spec
        self.control = control
        self.caller = caller
        self.idempotency_key = key
        self.fingerprint = fingerprint
        self.state = _QUEUED
        self.created_ns = time.time_ns()
        self.ended_ns = 0
        self.ended_at: float | None = None  # registry clock
        self.log: list[Entry] = []
        self.bytes = 0  # what the log holds, roughly: see `append`; tool data is added where it is measured
        self.task: asyncio.Future[None] | None = None  # the driver task; once done, a finished future (runs.py)
        self.lost: AgentError | None = None  # a mirror whose log cannot be continued: why, for its followers
        # a list only while someone waits: a run kept after its end holds none (one tracked object less a kept run)
        self._waiters: list[asyncio.Future[None]] | tuple[()] = ()

    # A durable run shared with a store sends its readers only what the store holds (`state/mirror.py`).
    stored_only = False
    stored = 0

    # Whether the run has ended (its state succeeded, failed or cancelled): set by `finish` alone, the one place that
    # ends it. A plain attribute, not a property over `state`: it is read a few times per call and event (a short
    # call 497,100 -> 493,900 instructions).
    finished = False

    @property
    def outcome(self) -> ev.FinalResponse | ev.RunFailed | None:
        last = self.log[-1].event if self.log else None
        return last if isinstance(last, _CLOSING) else None  # a tuple: `A | B` would make a union on every call

    def append(self, event: ev.Event) -> None:
        """Log an event with the next seq and wake the subscribers. Synchronous on purpose: the driver must not
        await between events (see `RunControl.scope`)."""
        log = self.log
        log.append(_entry(Entry, (len(log) + 1, time.time_ns(), event, 0)))
        self.bytes += EVENT_BYTES + len(getattr(event, "text", ""))
        if self._waiters:
            self._wake()

    def finish(self) -> None:
        """Set the final state from the last event; called once, by the driver."""
        outcome = self.outcome
        if isinstance(outcome, ev.FinalResponse):
            self.state = _SUCCEEDED
        elif isinstance(outcome, ev.RunFailed) and outcome.code == "CANCELLED":
            self.state = _CANCELLED
        else:
            self.state = _FAILED
        self.finished = True
        self.ended_ns = time.time_ns()
        if self._waiters:
            self._wake()

    def give_up(self, why: AgentError) -> None:
        """The log cannot be continued here (a mirror's store lost it; a durable run went on in another process):
        followers get `why` once they have read what is here."""
        self.lost = why
        if self._waiters:
            self._wake()

    def record(self) -> RunRecord:
        return RunRecord(
            self.id,
            self.caller,
            self.state.value,
            len(self.log),
            self.created_ns,
            self.ended_ns,
            self.outcome,
            self.fingerprint,
        )

    def resume_after(self, after_seq: int) -> int:
        """Where a WatchRun(after_seq) starts. The streams of a run with `ahead` send events before its log is kept,
        so a caller may hold seqs up to `ahead` past a crash's last kept one, which the process that recovered the run
        gave to other events from its `run_recovered` on. An after_seq that may be such a seq (within `ahead` of a
        `run_recovered` at or before it) starts at that `run_recovered`: it tells the caller to drop what it holds
        after the event's `seq`. A caller that held the same events gets them again, unchanged (same seqs)."""
        if not self.ahead or after_seq <= 0:
            return after_seq
        for entry in self.log[max(0, after_seq - self.ahead) : after_seq]:
            if type(entry.event) is ev.RunRecovered:
                return entry.seq - 1
        return after_seq

    async def reached(self, seq: int) -> None:
        """Return once the log holds `seq`, or the run has ended."""
        while len(self.log) < seq and not self.finished:
            if self.lost is not None:
                raise self.lost
            await self._changed()

    async def ended(self) -> None:
        """Return once the run has ended."""
        while not self.finished:
            if self.lost is not None:
                raise self.lost
            await self._changed()

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, ()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _waiter(self) -> asyncio.Future[None]:
        """A future done at the next change. One per waiting subscriber: cancelling one subscriber must not wake or
        cancel the others."""
        waiter = (self.control.loop or asyncio.get_running_loop()).create_future()  # no getpid: see RunControl
        if self._waiters:
            self._waiters.append(waiter)  # a list when not empty
        else:
            self._waiters = [waiter]
        return waiter

    async def _changed(self) -> None:
        await self._waiter()

    def cursor(self, after_seq: int = 0, *, coalesce_lag: int = 64, max_lag: int = 10_000) -> Cursor:
        """A reader of the log after `after_seq` (see `follow`), read without a generator: a face's stream reads it
        inline, one async-generator hop less per event."""
        return Cursor(self, after_seq, coalesce_lag, max_lag)

    async def follow(
        self, after_seq: int = 0, *, coalesce_lag: int = 64, max_lag: int = 10_000
    ) -> AsyncIterator[Entry]:
        """The events after `after_seq`, then live ones until the run ends. Replaying history is not lagging: a
        reader counts as behind only by the events logged since it subscribed that it has not read yet."""
        cursor = Cursor(self, after_seq, coalesce_lag, max_lag)
        while True:
            entry = cursor.take()
            if entry is None:
                waiter = cursor.more()
                if waiter is None:
                    return
                await waiter
                continue
            yield entry

    def _merged(self, index: int, end: int, max_bytes: int = 64 * 1024) -> Entry:
        """The run of same-kind, same-turn deltas starting at `index` (and before `end`), as one entry."""
        first = self.log[index]
        head = first.event
        assert isinstance(head, ev.TextDelta | ev.Thinking)
        parts = [head.text]
        size = len(head.text)
        last = first
        for entry in self.log[index + 1 : end]:
            e = entry.event
            if type(e) is not type(head) or not isinstance(e, ev.TextDelta | ev.Thinking) or e.turn != head.turn:
                break
            if size >= max_bytes:
                break
            parts.append(e.text)
            size += len(e.text)
            last = entry
        if last is first:
            return first
        merged = replace(head, text="".join(parts))
        return Entry(seq=last.seq, time_ns=last.time_ns, event=merged, first_seq=first.seq)


class Cursor:
    """One reader's place in a run's log: `take` the next entry (None when there is none yet), `more` waits for
    one. While the reader is more than `coalesce_lag` behind, consecutive deltas are merged for it; past `max_lag`
    events it is dropped (`SubscriberTooSlow`). Replaying history is not lagging: a reader counts as behind only by
    the events logged since it subscribed. A run whose readers get only what its store holds (`stored_only`) is
    read up to `stored`."""

    __slots__ = ("run", "log", "at", "joined", "coalesce_lag", "max_lag", "hold", "near")

    def __init__(self, run: Run, after_seq: int, coalesce_lag: int, max_lag: int) -> None:
        self.run = run
        self.log = run.log  # appended to, never replaced
        self.at = after_seq
        self.joined = len(run.log)
        self.coalesce_lag = coalesce_lag
        self.max_lag = max_lag
        self.hold = 0  # a merged stretch waits until the store holds seqs up to here (runs with `ahead`)
        # a reader at most this far behind gets the next entry as it is (none for a run read up to its store)
        self.near = 0 if run.stored_only else min(coalesce_lag, max_lag)

    def take(self) -> Entry | None:
        at = self.at
        lag = len(self.log) - at
        if lag <= self.near:  # the per-event path: nothing to merge, hold back or drop for
            if lag <= 0:
                return None
            entry = self.log[at]
            self.at = entry.seq
            return entry
        return self._take()

    def _take(self) -> Entry | None:
        log, at, run = self.log, self.at, self.run
        logged = len(log)
        kept = logged
        if run.stored_only:
            kept = min(logged, run.stored)
            logged = min(logged, kept + run.ahead)
        if at >= logged:
            return None
        lag = logged - at
        if lag > self.max_lag and logged - max(at, self.joined) > self.max_lag and not run.finished:
            raise SubscriberTooSlow(run.id, at, lag)
        entry = log[at]
        if lag > self.coalesce_lag and isinstance(entry.event, DELTAS):
            if kept < logged:
                # a merged stretch is sent only once kept: past the store a caller holds single events, so those a
                # restart replaced (`resume_after`) can be dropped seq by seq; it waits for the store to reach the
                # stretch's end as it is now, not as it grows (the store could trail a busy run for ever)
                self.hold = max(self.hold, logged)
            if kept < self.hold:
                return None
            entry = run._merged(at, kept)
        elif at >= kept and isinstance(entry.event, _CLOSING):  # a caller that saw the end, the end is kept
            return None
        self.at = entry.seq
        return entry

    def more(self) -> asyncio.Future[None] | None:
        """After `take` found nothing: None once the run has ended and all of it was read, else a future for the reader
        to await, done once there may be more (a future, not a coroutine: one object and frame less a wait). Raises
        why the log cannot go on here (`Run.lost`)."""
        run = self.run
        if run.finished and self.at >= len(self.log):
            return None
        lost = run.lost
        if lost is not None:
            if self.at < len(self.log) and isinstance(lost, RunHandedOver):
                raise lost.at(self.at)  # this reader was sent seqs up to `at` only
            raise lost
        return run._waiter()


def ended_state(outcome: ev.FinalResponse | ev.RunFailed) -> str:
    """The state a run whose closing event is `outcome` ended in (as `Run.finish` sets it), as a record says it."""
    if isinstance(outcome, ev.FinalResponse):
        return _SUCCEEDED.value
    return (_CANCELLED if outcome.code == "CANCELLED" else _FAILED).value
