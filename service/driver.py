"""A run's driver loop: the agent loop's events into the run's log as they come, text deltas coalesced, large tool
data in parts, the number of events bounded, and a crash ended as INTERNAL. This is the per-event path of a run:
nothing is looked up in it per event that can be looked up once."""

from __future__ import annotations

import logging
from collections.abc import Callable

from service import events as ev
from service.coalesce import Coalescer, LoopLoad
from service.config import RunsConfig
from service.durable.base import TakenOver
from service.durable.journal import Journal
from service.errors import RunAlreadyEnded, RunHandedOver, RunInterrupted
from service.loop import AgentLoop
from service.parts import split
from service.run import Run

log = logging.getLogger(__name__)


class _PassedOn:
    """The coalescer of a run whose events are not merged: nothing ever waits in it."""

    def flush(self) -> None:
        pass


_PASSED_ON = _PassedOn()


async def play(
    run: Run,
    loop: AgentLoop,
    config: RunsConfig,
    *,
    clock: Callable[[], float],
    load: LoopLoad,
    journal: Journal | None = None,
) -> None:
    """Drive `run` through `loop` to its last event (`journal`: a durable run's checkpoints). A durable run another
    process has claimed stops at once, with no closing event: its followers are told it goes on elsewhere."""
    # With merging off, a coalescer would only pass events on: none is made (its object and bound method cost every
    # run about 2,000 instructions), the events go straight to the log, and there is nothing to flush.
    coalescer: Coalescer | _PassedOn = _PASSED_ON
    add = run.append  # looked up once, not per event
    if config.coalesce_window_s > 0:
        coalescer = Coalescer(
            run.append,
            window_s=config.coalesce_window_s,
            max_window_s=config.coalesce_max_window_s,
            max_bytes=config.coalesce_max_bytes,
            clock=clock,
            load=load,
        )
        add = coalescer.add

    def acknowledge(event: ev.Event) -> None:
        # steering acknowledged in the log's order (service/interact.py); never after the closing event
        if run.outcome is not None:
            raise RunAlreadyEnded(f"run {run.id} has ended; the input was not taken")
        add(event)

    run.control.inbox.emit = acknowledge
    if log.isEnabledFor(logging.INFO):  # the extras cost a copy of the metadata even when the line is dropped
        log.info("run started", extra={"run_id": run.id, "model": run.spec.model, "metadata": dict(run.spec.metadata)})
    logged, max_events = run.log, config.max_events_per_run
    try:
        async for event in loop.run(run.spec, run.control, announce=False, journal=journal):
            if type(event) is ev.ToolResult or type(event) is ev.ToolResultChunk:
                pieces, size = split(event, config.max_event_data_bytes)
                run.bytes += size
                for piece in pieces:
                    add(piece)
            else:
                add(event)
                if journal is not None and (type(event) is ev.FinalResponse or type(event) is ev.RunFailed):
                    # ended: its state goes out with its closing event, not after its end's checkpoint (a crash in
                    # between would leave the shared record running for good)
                    run.finish()
            if len(logged) > max_events:
                run.control.stop_now(RunInterrupted(f"run {run.id} exceeded {config.max_events_per_run} events"))
    except TakenOver:
        log.warning("durable run taken over by another process; stopped here", extra={"run_id": run.id})
        coalescer.flush()
        if not run.finished:  # else only its end's checkpoint was refused: the run has ended here
            run.give_up(RunHandedOver(run.id, len(run.log), "was claimed by another process"))
    except Exception:
        # A bug, not a run failure: INTERNAL with the run id to quote; the log has the traceback.
        log.exception("run crashed", extra={"run_id": run.id})
        coalescer.flush()
        run.append(ev.RunFailed(code="INTERNAL", message=f"internal error in run {run.id}", retryable=False))
    finally:
        coalescer.flush()
        # `acknowledge` held the coalescer and the run: a run kept for watching after its end holds neither
        run.control.inbox.emit = _ended


def _ended(event: ev.Event) -> None:
    raise RunAlreadyEnded("the run has ended; the input was not taken")


def stopped(run: Run) -> ev.RunFailed:
    """The closing event of a run stopped before it ran: why the control stopped it, else a retryable error."""
    if run.control.stopping:
        reason = run.control.stop_reason()
        return ev.RunFailed(code=reason.code, message=reason.message, retryable=reason.retryable)
    return ev.RunFailed(code="UNAVAILABLE", message=f"run {run.id} was stopped", retryable=True)
