"""The run registry: runs outlive the streams that started them, can be found by id or idempotency key, watched,
cancelled, run in the background, and are forgotten after a retention period. A `Run` and its log are in
`service/run.py`, the loop that fills the log in `service/driver.py`, the lookups in `service/run_lookups.py` and the
registry's shutdown in `service/run_shutdown.py`.

Cancellation contract: a run is driven by its own task (`Run.task`), never by a caller's stream. Callers stop a run
through its `RunControl` (the run then ends with events saying so); only `RunRegistry.close` cancels driver tasks
outright, and it waits a bounded time for them: a driver that does not stop is abandoned (`service.aio`). A run ends
with its closing event and final state even when its driver is cancelled before it first runs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from service import events as ev
from service import tally, telemetry
from service.aio import Slots
from service.coalesce import LoopLoad
from service.config import RunsConfig
from service.control import RunControl, cancel_reason
from service.driver import play, stopped
from service.errors import CallerLimited, NotFound, QueueFull, RunCancelled, StateUnavailable
from service.loop import AgentLoop, RunSpec
from service.records.summaries import RunSummaryStore, SummaryWriter
from service.retention import Retention
from service.run import Run, RunState
from service.run_lookups import RunLookups, conflict
from service.run_shutdown import RunShutdown
from service.state.base import RunLookup, RunStore
from service.state.mirror import MirrorRun

if TYPE_CHECKING:
    from service.callers import Caller, CallerLimits
    from service.durable.journal import Journal
    from service.durable_runs import DurableRuns
    from service.state.sqlite_runs import SqliteRunLog

log = logging.getLogger(__name__)
_DoneCallback = Callable[[asyncio.Task[None]], None]


class RunRegistry(RunLookups, RunShutdown):
    def __init__(
        self,
        loop: AgentLoop,
        config: RunsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        load: LoopLoad | None = None,
        store: RunStore | None = None,
        summaries: RunSummaryStore | None = None,
        durable: DurableRuns | None = None,
        runlog: SqliteRunLog | None = None,
        limits: CallerLimits | None = None,
    ) -> None:
        """`store`: the shared run-state store (None: this process alone keeps its runs, as with memory://).
        `summaries`: where each run's summary goes when it ends, for GetRun once the run is forgotten. `durable`:
        checkpoints the runs whose spec is durable, continues claimed ones (None: no run is durable). `runlog`
        (without `store`): where durable runs' records and events are kept across a restart of this process.
        `limits`: the callers' in-process quotas (without `store`), which a run resumed here counts toward."""
        self.limits = limits if store is None else None
        self.loop = loop
        self.durable = durable
        self.store = store
        self.runlog = runlog if store is None else None
        self.elsewhere: RunLookup | None = store if store is not None else runlog  # runs this process does not hold
        self.summaries = summaries
        self.summary_writer = SummaryWriter(lambda: self.summaries)  # one task and one write per batch of ends
        if store is not None:
            store.on_cancel(self._cancel_requested)
        self.config = config
        self.clock = clock
        self.load = load or LoopLoad()
        self._load_probe: asyncio.Task[None] | None = None
        self.runs: dict[str, Run] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self.retention = Retention(config)
        self._background = Slots(config.background_max_concurrent)
        self._background_runs = 0  # running or queued
        self._janitor: asyncio.Task[None] | None = None
        self._ended: asyncio.Future[None] | None = None  # stands for the task of every ended run (`_driver_done`)
        self._on_end: list[Callable[[Run, bool], None]] = []

    def on_end(self, callback: Callable[[Run, bool], None]) -> None:
        """Call `callback(run, background)` when a run driven here ends (not when it is handed over)."""
        self._on_end.append(callback)

    async def open(
        self,
        spec: RunSpec,
        *,
        caller: Caller,
        limits: CallerLimits,
        key: str = "",
        fingerprint: str = "",
        deadline: float | None = None,
        background: bool = False,
    ) -> tuple[Run, bool]:
        """Start a run for `caller` within its quotas, or return the one its idempotency key names (wherever it
        runs, with a shared store). True when a new run was started."""
        existing = self.find(caller.name, key, fingerprint)
        if existing is not None:
            return existing, False
        if key and self.runlog is not None:
            # one node after a restart: a durable run that ended before it is in the run log only
            logged = await self.runlog.keyed(caller.name, key)
            existing = self.find(caller.name, key, fingerprint)  # started here meanwhile, by a call with the same key
            if existing is not None:
                return existing, False
            if logged is not None and logged not in self.runs:
                # a SubmitRun is answered with the run as it stands, not followed: a run waiting in the store's
                # queue would be followed only from its claim (found by a test: the answer waited 30 s)
                return await self._existing(self.runlog, logged, key, fingerprint, follow=not background), False
        if self.durable is not None:
            self.durable.check(spec)  # before any quota or key is taken
            if background and self.durable.queues(spec):
                return await self._enqueue(spec, caller, limits, key, fingerprint)
        store = self.store
        if store is None:
            # a caller without quotas (the usual one) has nothing to check or count: no admit, no count, no done
            # callback (about 7,000 instructions a run)
            limited = caller.limited
            # check and count in one synchronous step: no other start of this caller can pass in between
            refused = limits.admit(caller) if limited else None
            if refused is not None:
                raise CallerLimited(refused)
            # `limits.ended` in the driver's one done callback; the key was looked up above
            on_done = functools.partial(limits.ended, caller) if limited else None
            run = self._start_new(spec, caller.name, key, fingerprint, deadline, background, on_done)
            if limited:
                limits.started(caller)
            if background and self.durable is not None:
                await self.durable.record(run)  # SubmitRun answers once its run would survive a crash
            return run, True
        self._check_queue(background)
        run = self._new_run(spec, caller.name, key, fingerprint, deadline, store)
        # the background slot is held across the admission's await: once admitted (its quota and key taken) the run
        # must start, so no other start may fill the queue meanwhile
        self._background_runs += background
        try:
            admitted = await store.admit(run, key=key, fingerprint=fingerprint, limits=caller.config)
        finally:
            self._background_runs -= background
        if admitted.existing:
            return await self._existing(store, admitted.existing, key, fingerprint), False
        if admitted.refused:
            raise CallerLimited(admitted.refused)
        self._launch(run, background)
        if background and self.durable is not None:
            await self.durable.record(run)
        return run, True

    async def _existing(self, store: RunLookup, run_id: str, key: str, fingerprint: str, *, follow: bool = True) -> Run:
        other = self.runs.get(run_id)
        record = other.record() if other is not None else await store.record(run_id)
        if record is None:
            raise NotFound(f"idempotency_key {key!r} names run {run_id}, which was forgotten; use a new key")
        if record.fingerprint != fingerprint:
            raise conflict(key, record.run_id)
        if other is not None:
            return other
        return await store.mirror(record) if follow else MirrorRun(record)

    async def _enqueue(
        self, spec: RunSpec, caller: Caller, limits: CallerLimits, key: str, fingerprint: str
    ) -> tuple[Run, bool]:
        """A durable SubmitRun run into the fleet's queue (`DurableRuns.enqueue`): recorded in the shared run store
        with its first event, then queued in the checkpoint store; whichever process has a free slot claims it, and
        this one holds nothing of it (GetRun, WatchRun and CancelRun find it in the shared store as any other's)."""
        assert self.durable is not None
        await self.durable.room()
        store = self.store
        run = self._new_run(spec, caller.name, key, fingerprint, None, store)
        if store is not None:
            admitted = await store.admit(run, key=key, fingerprint=fingerprint, limits=caller.config)
            if admitted.existing:
                return await self._existing(store, admitted.existing, key, fingerprint), False
            if admitted.refused:
                raise CallerLimited(admitted.refused)
        elif (refused := limits.admit(caller)) is not None:  # one node: checked, not counted while it waits
            raise CallerLimited(refused)
        run.append(self.loop.started(spec))
        await self.durable.enqueue(run)
        if store is not None:
            store.forget(run)
        return run, True

    def background_free(self) -> int:
        return self.config.background_max_concurrent - self._background_runs

    def _cancel_requested(self, run_id: str, after_turn: bool) -> None:
        run = self.runs.get(run_id)
        if run is not None and not run.finished:
            self.cancel(run, after_turn=after_turn)

    def _check_queue(self, background: bool) -> None:
        capacity = self.config.background_max_concurrent + self.config.background_max_queued
        if background and self._background_runs >= capacity:
            raise QueueFull(
                f"the background queue is full ({self.config.background_max_queued} runs waiting); retry later"
            )

    def _new_run(
        self, spec: RunSpec, caller: str, key: str, fingerprint: str, deadline: float | None, store: RunStore | None
    ) -> Run:
        loop = asyncio.get_running_loop()  # once a run: its control holds it for the run's other asks
        limit = loop.time() + self.config.max_run_s
        control = RunControl(
            deadline=limit if deadline is None else min(deadline, limit),
            min_tool_budget_s=self.config.min_tool_budget_s,
            loop=loop,
        )
        if store is not None:
            return store.new_run(spec, control, caller=caller, key=key, fingerprint=fingerprint)
        if self.runlog is not None and spec.durable:  # kept across a restart; the others stay in memory only
            return self.runlog.new_run(spec, control, caller=caller, key=key, fingerprint=fingerprint)
        return Run(spec, control, caller=caller, key=key, fingerprint=fingerprint)

    def adopt(self, run: Run, journal: Journal, *, background: bool) -> None:
        """Drive a durable run claimed from a process that stopped (`DurableRuns`): its log already holds what was
        kept of it, and its journal's `run_recovered` event comes next. It counts toward its caller's
        max_concurrent_runs as it did before the restart (one node; a fleet's count is in the shared store)."""
        self._launch(run, background, journal, announce=False)
        limits = self.limits
        if limits is not None and run.task is not None:
            limits.resumed(run.caller)
            run.task.add_done_callback(lambda _: limits.ended_named(run.caller))

    def _launch(
        self,
        run: Run,
        background: bool,
        journal: Journal | None = None,
        *,
        announce: bool = True,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        if announce:
            run.append(self.loop.started(run.spec))  # at once: the first event does not wait for the driver task
        if journal is None and self.durable is not None:
            journal = self.durable.journal(run, background=background)
        self.runs[run.id] = run
        if run.idempotency_key:
            self._keys[(run.caller, run.idempotency_key)] = run.id
        if background:
            self._background_runs += 1
        # the loop's own create_task, named there: asyncio.create_task adds two Python calls to name the task
        loop = run.control.loop or asyncio.get_running_loop()
        done = functools.partial(self._driver_done, run, background, on_done)
        driver = self._drive(run, background, journal, done if on_done is None else None)
        run.task = loop.create_task(driver, name=f"run {run.id}")
        run.task.add_done_callback(done)
        if self._janitor is None:
            self._ended = loop.create_future()
            self._ended.set_result(None)
            self._janitor = asyncio.create_task(self._sweep_forever(), name="run janitor")
            self._load_probe = asyncio.create_task(self.load.probe_forever(), name="event loop load probe")

    def start(
        self,
        spec: RunSpec,
        *,
        caller: str,
        key: str = "",
        fingerprint: str = "",
        deadline: float | None = None,
        background: bool = False,
        on_done: Callable[[], None] | None = None,
    ) -> tuple[Run, bool]:
        """Start a run (or return the one this caller's idempotency key names). True when a new run was started;
        `on_done` is then called once its driver task is done."""
        existing = self.find(caller, key, fingerprint)
        if existing is not None:
            return existing, False
        return self._start_new(spec, caller, key, fingerprint, deadline, background, on_done), True

    def _start_new(
        self,
        spec: RunSpec,
        caller: str,
        key: str,
        fingerprint: str,
        deadline: float | None,
        background: bool,
        on_done: Callable[[], None] | None,
    ) -> Run:
        """A new run in this process's memory, launched (its key not found: the caller looked)."""
        self._check_queue(background)
        run = self._new_run(spec, caller, key, fingerprint, deadline, None)
        self._launch(run, background, on_done=on_done)
        return run

    async def keep_cancel(self, run: Run, *, after_turn: bool) -> None:
        """Keep a CancelRun of a durable run driven here where it outlives this process (the shared store, or the
        one node's run log), before the caller is answered: should this process die before the run stops, the one
        that revives it stops it (an outside finding: an acknowledged AFTER_TURN was lost to a kill -9, and the run
        went on to its end after the restart). A store away leaves the cancel to this process alone, as before."""
        kept = self.store if self.store is not None else self.runlog
        if kept is None or not run.spec.durable or run.finished:
            return
        try:
            await kept.mark_cancel(run.id, after_turn=after_turn)
        except StateUnavailable as exc:
            log.warning(
                "a CancelRun could not be kept beyond this process", extra={"run_id": run.id, "error": str(exc)}
            )

    def cancel(self, run: Run, *, after_turn: bool = False) -> None:
        reason = cancel_reason(after_turn=after_turn)
        if run.state is RunState.QUEUED and run.task is not None:
            run.control.stop_now(reason)
            run.task.cancel()
        elif after_turn:
            run.control.stop_after_turn(reason)
        else:
            run.control.stop_now(reason)

    async def _drive(self, run: Run, background: bool, journal: Journal | None, done: _DoneCallback | None) -> None:
        # Started: from here the finally below ends the run, and `_driver_done` (`done`) would find nothing to do
        # but call `on_done`; without one it is taken off (a done callback costs a run about 9,000 instructions).
        if done is not None:
            run.task.remove_done_callback(done)  # type: ignore[union-attr,arg-type]  # set before this first step
        telemetry.bind_run(run.id)  # every line logged by the run, its tools and its model calls names it
        tally.add(telemetry.ACTIVE, 1)
        # a background run waits for a slot; one continued from a process that stopped was running there and its
        # callers are following it: it takes a slot at once, over the cap if need be, ahead of runs never started
        # (an outside finding: recovered runs read QUEUED and waited 9 s behind newer ones), and holds it, so that
        # no queued run starts in its place (another: runs never started ran beside them past the cap)
        gated = background and (journal is None or journal.fresh or not journal.announce)
        if background and not gated:
            self._background.take()
        try:
            if gated:
                try:
                    await self._background.acquire()
                except asyncio.CancelledError:
                    if run.lost is not None:
                        # handed over at a drain while it waited: its next start (or a peer) takes it as queued (an
                        # outside finding: the closing event added here made every such SubmitRun end FAILED)
                        return
                    # cancelled while queued: our own cancel (CancelRun or shutdown), ended with an event
                    run.append(stopped(run))
                    if journal is not None and isinstance(run.control.stop_reason(), RunCancelled):
                        # its end recorded, or the next start would continue a run its caller cancelled (an
                        # outside finding: 2,513 such runs ran to the end after a restart)
                        await journal.end(RunState.CANCELLED.value)
                    return
            try:
                run.state = RunState.RUNNING
                await play(run, self.loop, self.config, clock=self.clock, load=self.load, journal=journal)
            finally:
                if background:
                    self._background.release()
        finally:
            tally.add(telemetry.ACTIVE, -1)
            self._end(run, background)
            run.task = self._ended  # nothing of the driver's is left to wait for (see `_driver_done`)

    def _driver_done(
        self, run: Run, background: bool, on_done: Callable[[], None] | None, task: asyncio.Task[None]
    ) -> None:
        # A task cancelled before its first step never runs its coroutine, so `_drive` (and its finally) never ran:
        # without this the run would stay QUEUED, and its followers wait, for ever.
        try:
            if not run.finished and run.lost is None:
                run.append(stopped(run))
                self._end(run, background)
        finally:
            if on_done is not None:  # one done callback per run, not one per party that waits for its end
                on_done()
            # A run stays watchable for retention_s with its log, not its driver: the task, its coroutine and
            # context go (seven tracked objects and 1.1 KB a kept run, bench.retained); a finished future stands in.
            run.task = self._ended

    def _end(self, run: Run, background: bool) -> None:
        """The end of a run's bookkeeping: its closing event if it has none, final state, metrics and log line. A
        durable run handed over (`run.lost`) has not ended: it goes on elsewhere, and nothing more is logged here."""
        if background:
            self._background_runs -= 1
            if self.durable is not None:
                self.durable.slot_freed()  # a queued run may start here now
        if run.lost is not None:
            return
        if not run.finished:  # a durable run is finished by its driver, at its closing event
            if run.outcome is None:
                run.append(ev.RunFailed(code="UNAVAILABLE", message=f"run {run.id} was stopped", retryable=True))
            run.finish()
        run.ended_at = at = self.clock()
        if self.retention.add(run.id, run.caller, at, run.bytes):
            self.sweep()  # over the byte budget: at once
        tally.add((telemetry.RUNS, run.outcome.code if isinstance(run.outcome, ev.RunFailed) else "OK"))
        if log.isEnabledFor(logging.INFO):  # the extras' dict is built before the level check otherwise
            log.info("run ended", extra={"run_id": run.id, "state": run.state.value, "events": len(run.log)})
        if self.summaries is not None:
            self.summary_writer.add(run)
        for callback in self._on_end:
            callback(run, background)

    def sweep(self) -> int:
        """Forget the ended runs past their retention, or beyond `max_retained_runs` or `max_retained_bytes`."""
        return self.retention.sweep(self.clock(), self.runs, self._keys)

    async def _sweep_forever(self) -> None:
        while True:
            await asyncio.sleep(self.retention.interval_s)
            self.sweep()
