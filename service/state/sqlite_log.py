"""The writer of the embedded run log (`sqlite_runs.py`): the durable runs' records and events go to data_dir/runs.db
behind the runs' backs, so that after `kill -9` and a restart GetRun and WatchRun still answer for them.

A durable run's driver appends to its in-process log as every run does (the driver never waits on the disk) and
notes the run here: a dict insertion. Its streams are sent its events as they form, up to AHEAD past what a round has
committed; its closing event once committed. A caller may so hold seqs that a crash lost and a restarted process
gives to other events: that process's `run_recovered` is at most AHEAD seqs before them, and a WatchRun from such a
seq starts at it (`Run.resume_after`), which tells the caller what to drop. One task
per process collects what is new of every noted run after a short linger and hands it to the database thread as one
transaction; the JSON encoding of the events happens there too, so the loop pays only the note and its share of the
hand-off. `flush(run)` skips the linger and returns once every event the run had logged when it was called is
committed: a checkpoint calls it first, so that the log of a run recovered from that checkpoint reaches at least the
checkpoint's seq (no gap between the two).

A failed write (disk full, I/O error) keeps the runs noted, is logged, and is retried with a backoff: the events wait
in the runs' own logs meanwhile (no copy), and flush waits with them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, NamedTuple

from service.run import Entry, Run
from service.state.mirror import SharedRun

log = logging.getLogger(__name__)

# A round waits this long for more events after the first: a transaction costs ~50-100 µs of CPU whatever it carries,
# and an unpaced run logs an event every few microseconds. A crash loses at most this much of a run's latest events
# (never those before its last checkpoint: see `flush`).
LINGER_S = 0.005
BACKOFF_S = (0.05, 2.0)
# How many events a durable run's streams may send past what the file holds: they wait beyond it (a run far ahead of
# its writer; the disk away). Also how far back of a caller's after_seq a restart's `run_recovered` is looked for.
AHEAD = 512


class Chunk(NamedTuple):
    """What one round writes of one run: its record as it stands and the entries not yet written."""

    run_id: str
    caller: str
    fingerprint: str
    key: str
    state: str
    created_ns: int
    ended_ns: int
    last_seq: int
    entries: list[Entry]


class LoggedRun(SharedRun):
    """A durable run driven here whose record and events the writer keeps on disk (a dict insertion per change)."""

    ahead = AHEAD  # its streams go ahead of the file (see the module's doc)

    def __init__(
        self,
        *args: Any,
        history: Sequence[Entry] = (),
        flush: Callable[[Run], Awaitable[None]] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self._flush = flush
        # seq 1, `run_started`, counts as kept: a run resumed with nothing kept starts its new log with the same event
        self.stored = 1
        if history:  # a run resumed after a restart: its log goes on after what the last process logged
            self.log.extend(history)
            self.created_ns = history[0].time_ns
            self.stored = len(history)

    async def kept(self) -> None:
        """Return once the file holds every entry logged so far: `stored` counts seq 1 as kept before it is, so the
        writer is asked (a queued SubmitRun answers once its record is in the file, not a round later)."""
        if self._flush is None:
            await super().kept()
        else:
            await self._flush(self)


IDLE_ROUND_S = 60.0


class LogWriter:
    def __init__(self, write: Callable[[list[Chunk], list[Any]], Awaitable[None]]) -> None:
        """`write(chunks, riders)`: commit one round in one transaction (on the database's own thread), with the
        riders' writes (`ride`) in it."""
        self._write = write
        self._riders: list[tuple[Any, asyncio.Future[None]]] = []
        self.pending: dict[str, Run] = {}
        self.written: dict[str, int] = {}  # run id -> seqs 1..n committed
        self.rounds = 0
        self._wake = asyncio.Event()
        self._urgent = asyncio.Event()
        self._idle = asyncio.Event()  # set while everything noted is written
        self._idle.set()
        self._waiters: list[tuple[str, int, asyncio.Future[None]]] = []
        self._task: asyncio.Task[None] | None = None
        # a quiet spell this long gets an empty round, in which the log deletes what has expired: without it an idle
        # server kept expired runs' rows on disk until its next write (an outside finding: 60,563 events rows)
        self.idle_round_s = IDLE_ROUND_S

    def note(self, run: Run) -> None:
        """`run` has new entries, or ended. Called by the driver for every event: no await, no I/O."""
        self.pending[run.id] = run
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()
            if self._task is None:  # lazily: a process with no durable run never starts the task nor opens the file
                self._task = asyncio.get_running_loop().create_task(self._run_forever(), name="run log writer")

    def resumed(self, run: Run) -> None:
        """A run whose entries so far came from the file (a restart): they are not written again."""
        self.written[run.id] = len(run.log)

    async def flush(self, run: Run) -> None:
        """Return once the entries `run` has logged so far are committed."""
        target = len(run.log)
        if self.written.get(run.id, 0) >= target and run.id not in self.pending:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((run.id, target, fut))
        self.note(run)
        self._urgent.set()
        await fut

    async def ride(self, payload: Any) -> None:
        """Commit `payload` (a batch of checkpoints) in the next round, at once (no linger), with every event noted
        before: one transaction where a flush then a checkpoint took two. Returns once committed; raises what the
        round raised (the round is retried, the rider is not: its caller retries)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._riders.append((payload, fut))
        self._urgent.set()
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run_forever(), name="run log writer")
        await fut

    def unwritten(self) -> int:
        return sum(len(run.log) - self.written.get(run_id, 0) for run_id, run in self.pending.items())

    async def idle(self, within_s: float) -> bool:
        """Wait (up to `within_s`, without the linger) until everything noted is written; False when it is not."""
        self._urgent.set()
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def close(self, within_s: float = 5.0) -> None:
        """Write what is left (up to `within_s`), then stop."""
        if self._task is None:
            return
        if not await self.idle(within_s):
            log.warning("closing with run events not written", extra={"unwritten": self.unwritten()})
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        self._task = None
        for *_, fut in self._waiters:
            fut.cancel()
        for _, fut in self._riders:
            fut.cancel()

    async def _woken(self) -> None:
        """Until a run is noted; every `idle_round_s` of quiet meanwhile, an empty round (the sweep of what has
        expired, when due; a failed one waits for the next)."""
        while True:
            try:
                async with asyncio.timeout(self.idle_round_s):
                    await self._wake.wait()
                return
            except TimeoutError:
                pass
            try:
                await self._write([], [])
            except Exception:
                log.exception("expired run events not deleted; trying again later")

    async def _run_forever(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            await self._woken()
            if not self._urgent.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._urgent.wait(), LINGER_S)
            self._wake.clear()
            self._urgent.clear()
            batch, self.pending = self.pending, {}
            riders, self._riders = self._riders, []
            chunks = [self._chunk(run) for run in batch.values()]
            try:
                await self._write(chunks, [payload for payload, _ in riders])
            except asyncio.CancelledError:
                for _, fut in riders:
                    fut.cancel()
                raise
            except Exception as exc:
                for _, fut in riders:
                    if not fut.done():
                        fut.set_exception(exc)
                log.exception("run events not written; retrying", extra={"runs": len(batch)})
                for run_id, run in batch.items():
                    self.pending.setdefault(run_id, run)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                self._wake.set()
                self._urgent.set()
                continue
            backoff = BACKOFF_S[0]
            self.rounds += 1
            for _, fut in riders:
                if not fut.done():
                    fut.set_result(None)
            for chunk, run in zip(chunks, batch.values(), strict=True):
                if isinstance(run, SharedRun):
                    run.mark_stored(chunk.last_seq)  # its streams may be sent these now
                if run.finished and chunk.last_seq == len(run.log) and run.id not in self.pending:
                    self.written.pop(run.id, None)  # all of it is on disk: nothing more to remember
                else:
                    self.written[run.id] = chunk.last_seq
            self._settle(chunks)
            if not self.pending:
                self._idle.set()

    def _chunk(self, run: Run) -> Chunk:
        start = self.written.get(run.id, 0)
        last = len(run.log)
        return Chunk(
            run.id,
            run.caller,
            run.fingerprint,
            run.idempotency_key,
            run.state.value,
            run.created_ns,
            run.ended_ns,
            last,
            run.log[start:last],  # entries are immutable: the database thread reads them as they are
        )

    def _settle(self, chunks: list[Chunk]) -> None:
        if not self._waiters:
            return
        reached = {chunk.run_id: chunk.last_seq for chunk in chunks}
        left = []
        for run_id, target, fut in self._waiters:
            if fut.done():
                continue
            if reached.get(run_id, -1) >= target:  # the run is in the next round otherwise: `flush` noted it
                fut.set_result(None)
            else:
                left.append((run_id, target, fut))
        self._waiters = left
