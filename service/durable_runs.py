"""Durable runs in the service (issue 18; decision 0001): which runs are checkpointed, the journal each one is driven
with, the continuation of the runs this process claims (its own after a restart, a dead peer's, a draining peer's),
and the hand-over of its own at a drain.

The registry launches a run with `journal(run)` (None: not durable, today's fast path, nothing paid); the loop
checkpoints each finished model turn and tool call through it (never per event). `start` opens the checkpoint store
and keeps looking for runs to continue (`CheckpointStore.recover`); each claimed run is rebuilt from its recorded
request and handed to the registry with a `Journal.resume`, whose `run_recovered` event goes first; its earlier events
are read back from the shared run store on a fleet, so that its seqs go on from there (`_revived`).

A process that loses a run (a peer claimed it, or this process released it at a drain) stops driving it at once and
sends nothing more: its streams end UNAVAILABLE with RUN_HANDED_OVER and the seq to WatchRun after.

The durable queue (a store that is a `DurableQueue`: PostgreSQL): a durable SubmitRun run is recorded in the shared
run store (its record and `run_started`) and queued in the checkpoint store, and no process holds it; each process
claims queued runs, oldest first, while it has free background slots (`_serve_queue`), and drives a claimed run as
it would continue one (`_resume`), without a `run_recovered` event: it never ran. Woken by a peer's enqueue (NOTIFY),
by a slot freed here, and every `durable.queue_poll_s` in case a notification was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from service.aio import cancel_and_wait
from service.config import DurableConfig, RunsConfig
from service.control import RunControl
from service.driver import stopped
from service.durable.base import CheckpointStore, DurableQueue, DurableRun, ExecutorIdInUse
from service.durable.journal import Journal
from service.errors import AgentError, QueueFull, RecordsUnavailable, RunCancelled, RunHandedOver, StateUnavailable
from service.events import ApprovalDecided, Event, RunFailed, ToolResult, Usage
from service.loop import AgentLoop
from service.run import Run, driving
from service.spec import RunSpec
from service.state.mirror import SharedRun

if TYPE_CHECKING:
    from service.state.base import RunKeeper

log = logging.getLogger(__name__)

START_WAIT_S = 10.0  # at most, for the first look: a database that does not answer leaves it to the next ones
DRAINED = "was handed over: the server driving it is shutting down"


def _step_key(event: Event) -> str | None:
    """The key of the step an event of the log stands for (Step.key): a turn's `usage`, a call's `tool_result`, an
    approval's `approval_decided`."""
    if type(event) is Usage:
        return f"turn:{event.turn}"
    if type(event) is ToolResult:
        return f"call:{event.call_id}"
    if type(event) is ApprovalDecided:
        return f"decided:{event.call_id}"
    return None


class Continuer(Protocol):
    """What `DurableRuns` needs of the registry to continue a claimed run (`service.runs.RunRegistry`)."""

    def adopt(self, run: Run, journal: Journal, *, background: bool) -> None:
        """Drive `run` with `journal` from here on."""

    def background_free(self) -> int:
        """How many more background runs this process may run now (`runs.background_max_concurrent`)."""


class DurableRuns:
    def __init__(
        self,
        store: CheckpointStore,
        config: RunsConfig,
        *,
        shared: RunKeeper | None = None,
        flush: Callable[[Run], Awaitable[None]] | None = None,
        durable: DurableConfig | None = None,
        queue: bool = False,
        one_node: bool = False,
    ) -> None:
        """`shared`: where the events of a run a dead peer (or this process before a restart) drove are kept: the
        fleet's run store, or one node's run log (None: nowhere). `flush(run)`: returns once the events the run has
        logged are kept; awaited before each checkpoint, so a run continued from it has no gap in its log. `queue`:
        durable SubmitRun runs wait in the store's queue (when it keeps one), not in this process's. `one_node`: no
        peer can continue a run (memory:// state), so a drained one waits for this node's next start."""
        self.store = store
        self.config = config
        self.shared = shared
        self.flush = flush
        self.one_node = one_node
        self._recovery: asyncio.Task[None] | None = None
        # the journals of the runs driven here, while they are (a run's task holds its journal)
        self._journals: weakref.WeakValueDictionary[str, Journal] = weakref.WeakValueDictionary()
        self._continuer: Continuer | None = None
        self.ready = False  # the store is open: durable runs may start
        self.durable_config = durable if durable is not None else DurableConfig()
        # the fleet's queue of durable SubmitRun runs, when the store keeps one (else the process's own queue)
        self.queue: DurableQueue | None = store if queue and isinstance(store, DurableQueue) else None
        self._queue_task: asyncio.Task[None] | None = None

    async def start(self, continuer: Continuer) -> None:
        """Open the store, then keep continuing the runs this process claims (at once for its own left from before
        a restart, within `durable.recover_interval_s` for a dead peer's). A store that cannot be opened (the
        records database away) does not stop the service: durable runs are refused until it opens, in the
        background."""
        self._continuer = continuer
        try:
            await self._open()
        except Exception as exc:
            log.warning(
                "the checkpoint store cannot be opened; durable runs are refused until it can",
                extra={"error": str(exc) or type(exc).__name__},
            )
            self._recovery = asyncio.create_task(self._open_later(), name="durable recovery")
            return
        self._recovery = asyncio.create_task(self.store.recover(self._resume), name="durable recovery")
        self._serve()
        # its own runs left from before a restart are in the registry before it serves (WatchRun finds them)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(START_WAIT_S):
                await self.store.looked.wait()

    async def _open(self) -> None:
        try:
            await self.store.open()
        except ExecutorIdInUse:
            # another live process on this data_dir has the kept id (tests, or two processes meant as one): this one
            # takes an id of its own, not kept, so its runs left by a crash go on only where a peer claims them
            kept, self.store.owner = self.store.owner, f"{self.store.owner}-{secrets.token_hex(3)}"
            log.warning(
                "executor id in use by another live process; using another (set durable.executor_id per process)",
                extra={"executor_id": kept, "using": self.store.owner},
            )
            await self.store.open()
        self.ready = True

    async def _open_later(self) -> None:
        delay = 1.0
        while True:
            await asyncio.sleep(delay)
            try:
                await self._open()
            except Exception:
                delay = min(2 * delay, 30.0)
                continue
            log.info("the checkpoint store is open; durable runs are taken again")
            self._serve()
            await self.store.recover(self._resume)

    def check(self, spec: RunSpec) -> None:
        """Refuse a durable run while the checkpoint store is not open (UNAVAILABLE, retryable), rather than start a
        run that would not survive a crash; a run that is not durable goes on as ever."""
        if spec.durable and not self.ready:
            raise RecordsUnavailable(
                "durable runs cannot start now: the records database that keeps their checkpoints does not answer; "
                "retry in a few seconds, or send durability NOT_DURABLE"
            )

    def journal(self, run: Run, *, background: bool) -> Journal | None:
        """The journal of a run about to start, if it is durable."""
        if not run.spec.durable:
            return None
        entries = run.log  # appended to, never replaced
        journal = self._journals[run.id] = Journal.start(
            self.store,
            run_id=run.id,
            caller=run.caller,
            request=run.spec.to_json(),
            background=background,
            last_seq=lambda: len(entries),
            before_step=self._flush(run),
            before_end=functools.partial(self._kept, run),
        )
        return journal

    async def _resume(self, stored: DurableRun, *, queued: bool = False) -> None:
        """Drive a claimed run here: continued (`run_recovered` first), or `queued`: claimed from the queue."""
        assert self._continuer is not None
        spec = RunSpec.from_json(stored.request)
        run = await self._revived(spec, stored.caller, stored.created)
        if isinstance(run, str):
            await self.store.end(stored.run_id, run)
            return
        entries = run.log
        # a SubmitRun that waited in this process's queue when it stopped never ran: it waits for a slot again, with
        # no run_recovered (an outside finding: after a kill -9 every such run started at once, 5 under a cap of 2)
        queued = queued or (stored.background and not stored.steps and len(entries) <= 1)
        journal = self._journals[run.id] = Journal.resume(
            self.store,
            stored,
            last_seq=lambda: len(entries),
            before_step=self._flush(run),
            before_end=functools.partial(self._kept, run),
            announce=not queued,
        )
        journal.note_log([(key, e.seq) for e in entries if (key := _step_key(e.event))])
        if queued:
            log.info("queued durable run claimed", extra={"run_id": run.id})
        else:
            log.info("durable run continued", extra={"run_id": run.id, "steps": len(stored.steps)})
        self._continuer.adopt(run, journal, background=stored.background)

    # --- the durable queue ----------------------------------------------------------------------------------------

    def _serve(self) -> None:
        if self.queue is not None and self._queue_task is None:
            self._queue_task = asyncio.create_task(self._serve_queue(self.queue), name="durable queue")

    async def _serve_queue(self, queue: DurableQueue) -> None:
        """Claim queued runs while this process has free background slots, oldest first, and start them."""
        assert self._continuer is not None
        poll_s = self.durable_config.queue_poll_s
        while True:
            queue.queue_wake.clear()  # before the look: a wake-up during it makes another look
            try:
                free = self._continuer.background_free()
                cap = self.durable_config.queue_max_running
                claimed = [] if free <= 0 else await queue.claim_queued(free, max_running=cap)
                for stored in claimed:
                    try:
                        await self._resume(stored, queued=True)
                    except Exception:  # the shared run store away: the run is ours, recovery starts it later
                        log.exception("a claimed queued run could not start yet", extra={"run_id": stored.run_id})
                        queue.resume_later(stored.run_id)
            except Exception:  # the database away: the runs stay queued for the next look
                log.exception("the durable queue could not be read now; trying again")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(poll_s):
                    await queue.queue_wake.wait()

    def slot_freed(self) -> None:
        """A background run ended here: look at the queue again at once."""
        if self.queue is not None:
            self.queue.queue_wake.set()

    def queues(self, spec: RunSpec) -> bool:
        """Whether a SubmitRun run with `spec` waits in the fleet's queue (rather than in this process's)."""
        return self.queue is not None and spec.durable

    async def room(self) -> None:
        """QueueFull when the fleet's queue is full, before anything of a new run is written (`enqueue` checks it
        again, exactly)."""
        assert self.queue is not None
        with _database("queued"):
            if await self.queue.queued() >= self.durable_config.queue_max:
                raise _full(self.durable_config.queue_max)

    async def enqueue(self, run: Run) -> None:
        """Queue a new durable SubmitRun run for whichever process has a slot, once its record and first event are
        in the shared run store (the claimer goes on from there). QueueFull when the fleet's queue filled since
        `room`; then, as on any failure, the run ends here as the caller is answered, so that its record does not
        say QUEUED for good."""
        assert self.queue is not None
        limit = self.durable_config.queue_max
        queued = DurableRun(
            run_id=run.id, caller=run.caller, owner="", state="queued", request=run.spec.to_json(), background=True
        )
        try:
            try:
                async with asyncio.timeout(5.0):
                    await self._kept(run)
            except TimeoutError:
                raise StateUnavailable("the shared run state cannot be reached; retry in a few seconds") from None
            with _database("queued"):
                if not await self.queue.enqueue(queued, limit=limit):
                    raise _full(limit)
        except AgentError as exc:
            run.append(RunFailed(code=exc.code, message=exc.message, retryable=True))
            run.finish()
            raise
        self.queue.queue_wake.set()

    async def _kept(self, run: Run) -> None:
        """Return once the run's log so far is in the store that outlives this process."""
        if isinstance(run, SharedRun):
            await run.kept()
        elif self.flush is not None:
            await self.flush(run)

    async def position(self, run_id: str) -> int:
        """The run's place in the fleet's queue (1: next), 0 when not queued (or no fleet queue)."""
        if self.queue is None:
            return 0
        with _database("looked up in the queue"):
            return await self.queue.queue_position(run_id)

    async def cancel_queued(self, run_id: str) -> bool:
        """Cancel a run waiting in the fleet's queue, from any process: it never starts, and its log ends with its
        cancellation. False when it is not queued (any more: a process claimed it)."""
        if self.queue is None:
            return False
        with _database("cancelled"):
            if not await self.queue.cancel_queued(run_id):
                return False
        stored = await self.store.load(run_id)
        if stored is None or self.shared is None:
            return True
        run = await self._revived(RunSpec.from_json(stored.request), stored.caller)
        if isinstance(run, str):
            return True
        run.control.stop_now(RunCancelled("cancelled by CancelRun while queued"))
        run.append(stopped(run))
        run.finish()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await self._kept(run)
        log.info("queued durable run cancelled", extra={"run_id": run_id})
        return True

    def _flush(self, run: Run) -> Callable[[], Awaitable[None]] | None:
        return None if self.flush is None else functools.partial(self.flush, run)

    async def _revived(self, spec: RunSpec, caller: str, created: float = 0.0) -> Run | str:
        """The run to drive again, its log holding what was kept of it: on a fleet its events in the shared store, on
        one node those in its run log (data_dir/durable.db), so that its seqs go on from there. Or
        the final state of a run whose closing event was out before the crash (its end not yet recorded). Its
        deadline is `runs.max_run_s` from its first start (`created`, wall time, kept with the run), not from now:
        a run that crashes and resumes again and again still ends on time."""
        ran_s = max(0.0, time.time() - created) if created else 0.0
        loop = asyncio.get_running_loop()
        limit = loop.time() + self.config.max_run_s - ran_s
        control = RunControl(deadline=limit, min_tool_budget_s=self.config.min_tool_budget_s, loop=loop)
        if self.shared is not None:
            run = await self.shared.revive(spec, control, caller=caller)
            if isinstance(run, str) or run.log:
                return run
        else:
            run = Run(spec, control, caller=caller, key="", fingerprint="")
        run.append(AgentLoop.started(spec))
        return run

    async def stop_recovering(self) -> None:
        """At a drain: claim nothing more (the runs to continue, and the queued ones, are a peer's to take now)."""
        if self._queue_task is not None:
            await cancel_and_wait([self._queue_task], 5.0)
            self._queue_task = None
        if self._recovery is not None:
            await cancel_and_wait([self._recovery], 5.0)
            self._recovery = None

    async def hand_over(self, runs: Sequence[Run]) -> None:
        """Give the durable ones of `runs` still going up at a drain, not failed: each stops where it is (its
        streams end RUN_HANDED_OVER), its events are out (in the shared store), and then it is released for a peer
        to claim at once. A checkpoint the stop cut off is either committed before the release or not at all; a
        tool call it cut off is continued as any crash's (run again if safe, else OUTCOME_UNKNOWN)."""
        going = set(driving(runs))
        runs = [r for r in runs if r.task in going and not r.finished and self._recorded(r)]
        if not runs:
            return
        log.warning("handing durable runs over", extra={"runs": len(runs)})
        for run in runs:  # before the cancel, so that the driver ends nothing: the seq named is then at most what
            # a stream has sent when it ends (it sends the whole log first): a WatchRun from it repeats, never skips
            run.give_up(RunHandedOver(run.id, len(run.log), DRAINED, one_node=self.one_node))
        await cancel_and_wait(driving(runs), 5.0)
        if self.shared is not None and not await self.shared.flushed(5.0):
            log.warning("handing runs over with events not shipped: a peer continues after the last one shipped")
        for run in runs:
            try:
                await self.store.release(run.id)
            except Exception:  # the database away: the run stays ours, and a peer claims it once this process is gone
                log.exception("a durable run could not be released", extra={"run_id": run.id})

    async def record(self, run: Run) -> None:
        """Record a new durable run now rather than when its driver starts it: a background run, before SubmitRun
        answers with its id (a crash after the answer must not lose it, queued or not)."""
        journal = self._journals.get(run.id)
        if journal is not None:
            await journal.record()

    def _recorded(self, run: Run) -> bool:
        """Whether `run` is durable and recorded: one still queued, or not yet recorded, has nothing a peer could
        continue, and is interrupted as a run that is not durable."""
        journal = self._journals.get(run.id)
        return journal is not None and journal.recorded

    async def aclose(self) -> None:
        await self.stop_recovering()
        with contextlib.suppress(Exception):
            await self.store.aclose()


def _full(limit: int) -> QueueFull:
    return QueueFull(f"the durable queue is full ({limit} runs waiting, durable.queue_max); retry later")


@contextlib.contextmanager
def _database(what: str) -> Iterator[None]:
    """The records database failing under a queue operation: UNAVAILABLE to the caller (retryable), not INTERNAL."""
    try:
        yield
    except AgentError:
        raise
    except Exception as exc:
        raise RecordsUnavailable(
            f"the run cannot be {what} now: the records database that keeps the queue does not answer; retry shortly"
        ) from exc
