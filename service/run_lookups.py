"""Where a run is found: this process's runs, the shared store's (or, on one node, the run log's of a process that
ran before a restart) and the summaries of ended ones. `RunRegistry` (`service/runs.py`) mixes this in; it owns the
attributes used here."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from service.errors import IdempotencyConflict, NotFound, RunAlreadyEnded
from service.listing import RunQuery, newest
from service.run import Run, RunRecord, RunState

if TYPE_CHECKING:
    from service.config import RunsConfig
    from service.records.summaries import RunSummaryStore
    from service.retention import Retention
    from service.state.base import RunLookup, RunStore


class RunLookups:
    config: RunsConfig
    runs: dict[str, Run]
    _keys: dict[tuple[str, str], str]
    retention: Retention
    store: RunStore | None
    elsewhere: RunLookup | None
    summaries: RunSummaryStore | None

    def get(self, run_id: str, caller: str | None = None) -> Run:
        """The run `run_id`; with `caller`, only if that caller started it: another caller's run is NotFound with
        the very message of an unknown id, so that nothing confirms the id names a run."""
        run = self.runs.get(run_id)
        if run is None or (caller is not None and run.caller != caller):
            why = self.retention.why_forgotten(run_id, caller)
            if why is not None:
                raise NotFound(f"run {run_id!r} ended and was forgotten: {why}")
            raise NotFound(
                f"no run {run_id!r}: unknown, or it ended more than {self.config.retention_s:g} s ago and was forgotten"
            )
        return run

    def find(self, caller: str, key: str, fingerprint: str) -> Run | None:
        """The run this caller started with this idempotency key, if still retained."""
        if not key:
            return None
        run_id = self._keys.get((caller, key))
        run = self.runs.get(run_id) if run_id else None
        if run is not None and run.fingerprint != fingerprint:
            raise conflict(key, run.id)
        return run

    async def record(self, run_id: str, caller: str) -> RunRecord:
        """What GetRun answers: this process's run, else the shared store's record of it, else its summary."""
        try:
            return self.get(run_id, caller).record()
        except NotFound:
            record = None if self.elsewhere is None else await self.elsewhere.record(run_id)
            if record is None and self.summaries is not None:
                summary = await self.summaries.get(run_id)
                if summary is not None:
                    record = RunRecord(
                        summary.run_id,
                        summary.caller,
                        summary.state,
                        summary.last_seq,
                        summary.created_ns,
                        summary.ended_ns,
                        summary.outcome,
                    )
            if record is None or record.caller != caller:
                raise
            return record

    async def list_runs(self, query: RunQuery) -> list[list[RunRecord]]:
        """What each place that keeps runs answers to a ListRuns query (`service/listing.py` merges them): this
        process's runs, the shared store's, the summaries of ended ones."""
        pages = [newest((run.record() for run in self.runs.values() if run.caller == query.caller), query)]
        if self.store is not None:
            pages.append(self._current(await self.store.list_runs(query), query))
        if self.summaries is not None:
            pages.append(await self.summaries.list_runs(query))
        return pages

    def _current(self, records: list[RunRecord], query: RunQuery) -> list[RunRecord]:
        """The store's records, a run driven here as it is now: its ending may not be shipped yet."""
        current = [run.record() if (run := self.runs.get(r.run_id)) is not None else r for r in records]
        return [record for record in current if query.admits(record)]

    async def watch(self, run_id: str, caller: str, after_seq: int = 0) -> Run:
        """The run to follow: this process's own, else a mirror of the one another process drives (or drove, before
        a restart). A caller may have seen, from the driving process, a seq not yet shipped here: up to a second is
        given for it to arrive."""
        try:
            return self.get(run_id, caller)
        except NotFound:
            if self.elsewhere is None:
                raise
            record = await self.elsewhere.record(run_id)
            if record is None or record.caller != caller:
                raise
            mirror = await self.elsewhere.mirror(record)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await mirror.reached(after_seq)
            return mirror

    async def cancel_elsewhere(self, record: RunRecord, *, after_turn: bool) -> RunRecord:
        """Cancel a run another process drives: the store reaches its owner; the final record when the run ends
        within a second (IMMEDIATE), else the record as it stands."""
        assert self.elsewhere is not None
        if record.state == RunState.CANCELLED.value:
            return record
        if record.finished:
            raise RunAlreadyEnded(f"run {record.run_id} already ended ({record.state}); nothing to cancel")
        return await self.elsewhere.cancel(record, after_turn=after_turn, wait_s=0.0 if after_turn else 1.0)


def conflict(key: str, run_id: str) -> IdempotencyConflict:
    return IdempotencyConflict(
        f"idempotency_key {key!r} was used by run {run_id} with a different request; use a new key"
    )
