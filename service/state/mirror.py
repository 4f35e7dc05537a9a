"""The two kinds of `Run` a shared store adds: `SharedRun`, driven here with its log shipped to the store, and
`MirrorRun`, driven by another process and read here from the store."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from service import events as ev
from service.control import RunControl
from service.errors import StateUnavailable
from service.loop import RunSpec
from service.run import EVENT_BYTES, Entry, Run, RunRecord, RunState


class SharedRun(Run):
    """A run this process drives while its log is shared: each change also tells the store's shipper, which sends
    the new entries in its next batch (a set insertion here, never a wait).

    A durable run's streams are sent only what the store holds (`stored`): should this process die, the process
    that continues the run goes on from the store's last seq, and a caller must never have been sent a seq that is
    then reused for another event. It costs a durable run's streams the shipping round (~5 ms; under load up to
    `redis_ship.MAX_REST_S` more), and they wait while the store is away; other runs' streams are sent at once."""

    # How far past the store a durable run's streams may go (0: not at all, the fleet's rule). One node sets it
    # (sqlite_log.AHEAD): its streams send events as they form, and a restart re-streams the lost tail
    # (`resume_after`). The closing event always waits for the store: a caller that saw the end, the end is kept;
    # so does a stretch of merged deltas.
    ahead = 0

    def __init__(self, *args: Any, shipped: Callable[[Run], None], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.changed = shipped
        self.stored = 0  # seqs 1..stored are in the store
        self.stored_only = self.spec.durable  # its readers' `Cursor` stops at `stored`

    def mark_stored(self, seq: int) -> None:
        """The shipper has put seqs up to `seq` in the store."""
        if seq > self.stored:
            self.stored = seq
            if self._waiters:
                self._wake()

    async def kept(self) -> None:
        """Return once the store holds every entry logged so far (bound it with a timeout: the store may be away)."""
        seq = len(self.log)
        while self.stored < seq:
            await self._changed()

    def append(self, event: ev.Event) -> None:
        super().append(event)
        self.changed(self)

    def finish(self) -> None:
        super().finish()
        self.changed(self)


class MirrorRun(Run):
    """Another process's run, as this one sees it: its log is filled from the shared store with the entries (seqs,
    times) the driver logged, so that `follow` (coalescing, slow-subscriber drop) serves watchers here as it does
    there. It has no driver here: `task` is None and its control steers nothing."""

    def __init__(self, record: RunRecord) -> None:
        spec = RunSpec(run_id=record.run_id, message="", model="", system=None, max_turns=0, max_tokens=0, tools=())
        super().__init__(spec, RunControl(), caller=record.caller, key="", fingerprint=record.fingerprint)
        self.state = RunState(record.state) if not record.finished else RunState.RUNNING
        self.created_ns = record.created_ns

    def extend(self, entries: list[Entry], ended_ns: int = 0) -> None:
        """Entries read from the store, in order, continuing the log without a gap; the run's last one ends it."""
        for entry in entries:
            if entry.seq <= len(self.log):
                continue  # read twice across a reconnect: already here
            if entry.seq > len(self.log) + 1:
                self.lost = StateUnavailable(
                    f"run {self.id}'s events {len(self.log) + 1}..{entry.seq - 1} are missing from the shared store; "
                    f"the replica that drives the run still has them: retry shortly"
                )
                break
            self.log.append(entry)
            self.bytes += EVENT_BYTES
        if self.state is RunState.QUEUED and len(self.log) > 1:
            self.state = RunState.RUNNING
        if self.outcome is not None and not self.finished:
            self.finish()
            self.ended_ns = ended_ns or self.log[-1].time_ns
        elif self._waiters:
            self._wake()
