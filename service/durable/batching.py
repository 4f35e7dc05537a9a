"""What the SQLite and PostgreSQL checkpoint stores share: the batched writer (every write that arrived while the last
batch committed goes into the next one, and each caller returns once its own row is committed), the fence verdicts
(a step or an end of a run this process no longer owns raises TakenOver) and the recovery loop around the
backend's claim.

Cancellation: a caller cancelled while it waits leaves its write in the batch (it may commit); the writer task and
`recover` are cancelled by `aclose` and by their owner respectively, and never swallow the cancellation.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from service.durable.base import DurableRun, Step, TakenOver

log = logging.getLogger(__name__)

PRUNE_EVERY_S = 60.0
PRUNE_BATCH = 1000  # runs a prune deletes at most: one short transaction, not a long lock on a big backlog

FORMAT = 1
"""Version of the JSON in `request` and `value`: a reader refuses a newer one rather than misread it."""


def encode(value: dict[str, Any]) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def decode(text: str, fmt: int) -> dict[str, Any]:
    if fmt > FORMAT:
        raise ValueError(f"a checkpoint in format {fmt}, written by a newer version (this one reads {FORMAT})")
    value = json.loads(text)
    if not isinstance(value, dict):
        raise ValueError("a checkpoint value is not a JSON object")
    return value


@dataclass(slots=True)
class Batch:
    """The writes of one commit; `owned` is filled by the backend with the fenced runs it found still this
    process's (their steps and ends were written; the others' were refused)."""

    begins: list[DurableRun] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    ends: list[tuple[str, str]] = field(default_factory=list)  # (run_id, state)
    releases: list[str] = field(default_factory=list)
    owned: set[str] = field(default_factory=set)

    @property
    def fenced(self) -> list[str]:
        """Runs whose writes in this batch need them to be ours."""
        return [s.run_id for s in self.steps] + [r for r, _ in self.ends]


Op = tuple[str, Any, "asyncio.Future[None]"]


class BatchingStore:
    """The `CheckpointStore` methods over a backend's `_write(batch)` and `_claim()`."""

    def __init__(self, owner: str, *, recover_interval_s: float, keep_ended_s: float | None = None) -> None:
        self.owner = owner
        self.recover_interval_s = recover_interval_s
        self.keep_ended_s = keep_ended_s  # None: ended runs' checkpoints are kept for good
        self._pruned_at = -math.inf  # monotonic time of the last prune
        self.batches = 0  # batches committed: one transaction (or one autocommit statement) each
        self._queue: asyncio.Queue[Op] = asyncio.Queue()
        self._writer: asyncio.Task[None] | None = None
        # Runs this process drives now: never claimed again by its own `recover` (a driver that lost a run and has
        # not written since would otherwise drive it a second time here, should it come back to this process).
        self._driving: set[str] = set()
        # Runs this process gave up (drain): its own `recover` leaves them to a peer (or to the next start).
        self._released: set[str] = set()
        self._leftovers: list[str] = []  # its own running runs from before a restart, found at `open`
        self._wake = asyncio.Event()
        # set once `recover` has looked the first time: a process serves its own runs left from before a restart
        # from its first call on, not a moment later
        self.looked = asyncio.Event()

    # --- the protocol -------------------------------------------------------------------------------------------

    async def begin(self, run: DurableRun) -> None:
        await self._submit("begin", run)
        self._driving.add(run.run_id)

    async def put(self, step: Step) -> None:
        await self._submit("step", step)

    async def end(self, run_id: str, state: str) -> None:
        try:
            await self._submit("end", (run_id, state))
        finally:
            self._driving.discard(run_id)

    async def release(self, run_id: str) -> None:
        self._released.add(run_id)
        self._driving.discard(run_id)
        await self._submit("release", run_id)

    async def recover(self, resume: Callable[[DurableRun], Awaitable[None]]) -> None:
        while True:
            try:
                await self._claim_and_resume(resume)
            except Exception:  # the database away (or a bug): the runs stay where they are for the next look
                log.exception("durable runs could not be recovered now; trying again")
            self.looked.set()
            await self._prune_now_and_then()
            await self._wait_for_work()

    async def _claim_and_resume(self, resume: Callable[[DurableRun], Awaitable[None]]) -> None:
        claimed = await self._claim()
        for i, run_id in enumerate(claimed):
            try:
                run = await self.load(run_id)
            except BaseException:  # ours now, so no peer will take them: the next look hands them over
                self._leftovers[:0] = claimed[i:]
                raise
            if run is None or run.owner != self.owner:
                continue  # ended or taken between the claim and the load
            self._driving.add(run_id)
            log.info("durable run claimed", extra={"run_id": run_id, "steps": len(run.steps)})
            try:
                await resume(run)
            except Exception:  # e.g. the shared run store away: ours still, so the next look tries it again
                log.exception("resuming a durable run failed; trying again", extra={"run_id": run_id})
                self._driving.discard(run_id)
                self._leftovers.append(run_id)

    def resume_later(self, run_id: str) -> None:
        """A run claimed here whose start failed (the shared run store away): ours still, so no peer takes it; the
        next look of `recover` continues it."""
        self._driving.discard(run_id)
        self._leftovers.append(run_id)
        self._wake.set()

    async def load(self, run_id: str) -> DurableRun | None:
        raise NotImplementedError

    async def prune(self, before: float) -> int:
        """Delete the checkpoints (request and steps) of runs that ended before `before` (wall time), oldest first,
        at most PRUNE_BATCH runs a call; how many. Nothing reads an ended run's checkpoints (its events, in the run
        log, serve GetRun and WatchRun for `runs.retention_s`), yet each keeps ~10 KB: without this the file grows."""
        raise NotImplementedError

    async def _prune_now_and_then(self) -> None:
        """At most once every PRUNE_EVERY_S, from `recover`'s loop (each process of a fleet: the deletes are
        idempotent); a failure waits for the next time."""
        now = time.monotonic()
        if self.keep_ended_s is None or now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        before, deleted = time.time() - self.keep_ended_s, 0
        try:
            # a batch at a time (each a short transaction) until one comes back short: a process ending more than a
            # batch of durable runs a minute would otherwise never catch up
            while (batch := await self.prune(before)) == PRUNE_BATCH:
                deleted += batch
            deleted += batch
        except Exception:
            log.exception("ended durable runs' checkpoints could not be deleted now; trying again later")
        if deleted:
            log.info("ended durable runs' checkpoints deleted", extra={"deleted": deleted})

    # --- the writer ---------------------------------------------------------------------------------------------

    def _start_writer(self) -> None:
        self._writer = asyncio.get_running_loop().create_task(self._write_loop(), name="durable-writer")

    async def _stop_writer(self) -> None:
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer
            self._writer = None

    async def _submit(self, kind: str, payload: Any) -> None:
        if self._writer is None:
            raise RuntimeError("the checkpoint store is not open")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((kind, payload, fut))
        await fut

    async def _write_loop(self) -> None:
        while True:
            ops = [await self._queue.get()]
            while not self._queue.empty():
                ops.append(self._queue.get_nowait())
            batch = Batch()
            for kind, payload, _ in ops:
                if kind == "begin":
                    batch.begins.append(payload)
                elif kind == "step":
                    batch.steps.append(payload)
                elif kind == "end":
                    batch.ends.append(payload)
                else:
                    batch.releases.append(payload)
            try:
                await self._write(batch)
            except asyncio.CancelledError:
                for *_, fut in ops:
                    fut.cancel()
                raise
            except Exception as exc:  # every waiter of the batch learns that it failed
                for *_, fut in ops:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            self.batches += 1
            for kind, payload, fut in ops:
                if fut.done():
                    continue  # its caller was cancelled
                run_id = payload.run_id if kind == "step" else payload[0] if kind == "end" else None
                if run_id is not None and run_id not in batch.owned:
                    self._driving.discard(run_id)
                    fut.set_exception(TakenOver(f"run {run_id} is owned by another process now"))
                else:
                    fut.set_result(None)

    async def _write(self, batch: Batch) -> None:
        raise NotImplementedError

    async def _claim(self) -> list[str]:
        """Claim what this process should continue now; the ids claimed."""
        raise NotImplementedError

    async def _wait_for_work(self) -> None:
        """Until `_wake` (runs were released) or the next look is due."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.recover_interval_s):
                await self._wake.wait()
        self._wake.clear()

    def _not_mine(self) -> list[str]:
        """Runs a claim of this process must leave alone (see `_driving` and `_released`)."""
        return [*self._driving, *self._released]
