"""How the run registry (`service/runs.py`, which mixes this in and owns the attributes used here) stops: running
runs get a grace period, then durable ones are handed over to another process and the others interrupted with a
retryable error; `close` then cancels what is left and the registry's own tasks."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from service.aio import cancel_and_wait
from service.errors import RunInterrupted, ServerDraining
from service.run import Run, RunState, driving

if TYPE_CHECKING:
    from service.durable_runs import DurableRuns
    from service.loop import AgentLoop
    from service.records.summaries import SummaryWriter
    from service.state.base import RunLookup, RunStore

log = logging.getLogger("service.runs")  # the registry's log lines, as they were before the move


def _watch_elsewhere(run_id: str) -> ServerDraining:
    return ServerDraining(
        f"this replica is shutting down; run {run_id} goes on where it runs: resume with WatchRun from the last seq "
        "you received, on another replica"
    )


class RunShutdown:
    loop: AgentLoop
    runs: dict[str, Run]
    durable: DurableRuns | None
    elsewhere: RunLookup | None
    store: RunStore | None
    summary_writer: SummaryWriter
    _janitor: asyncio.Task[None] | None
    _load_probe: asyncio.Task[None] | None

    async def shutdown(self, grace: float) -> None:
        """Give running runs `grace` seconds, then hand the durable ones over to another process (`DurableRuns`) and
        stop the others with a retryable error naming each run."""
        if self.durable is not None:
            await self.durable.stop_recovering()
        live = driving(self.runs.values())
        if live:
            _, pending = await asyncio.wait(live, timeout=grace)
            if pending:
                log.warning("grace period over; interrupting runs", extra={"runs": len(pending)})
        if self.durable is not None:
            await self.durable.hand_over(list(self.runs.values()))
        for run in self.runs.values():
            if not run.finished:
                reason = RunInterrupted(
                    f"run {run.id} was interrupted: the server is shutting down; retry on another replica"
                )
                if run.state is RunState.QUEUED and run.task is not None:
                    run.control.stop_now(reason)
                    run.task.cancel()
                run.control.stop_now(reason)
        live = driving(self.runs.values())
        if live:
            await asyncio.wait(live, timeout=5)
        if self.store is not None:  # streams here following runs that other replicas drive: told, not cut
            self.store.stop_watching(_watch_elsewhere)

    async def close(self) -> None:
        """Cancel the runs still going (after `shutdown`, none should be) and the registry's own tasks. A driver
        that has not stopped after `2 * abandon_after_s` of the loop is abandoned: longer than the calls of a turn
        wait (1x), so that the layer that can say which calls are stuck is the one that does."""
        tasks = driving(self.runs.values())
        tasks += [t for t in (self._janitor, self._load_probe) if t is not None]
        await cancel_and_wait(tasks, 2 * self.loop.abandon_after_s)
        await self.summary_writer.flushed(timeout_s=5.0)
        if self.elsewhere is not None:
            await self.elsewhere.close()  # after the runs: their last events are shipped (or written) first
        if self.durable is not None:
            await self.durable.aclose()
