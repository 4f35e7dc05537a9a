"""An in-memory CheckpointStore for the loop's tests: what the records database would hold (`Ledger`), shared by the
stores of several "processes" (one owner each), so that a test can crash one and let another take its runs over.

Test-only: the embedded default is SQLite, whose store (like PostgreSQL's) keeps the same contract for real. Values
go through JSON as they would there, so a step the loop writes that a database could not keep fails here too."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import replace

from service.durable.base import DurableRun, Step, TakenOver


class Ledger:
    """The durable runs and their steps, as the shared database holds them."""

    def __init__(self) -> None:
        self.runs: dict[str, DurableRun] = {}
        self.steps: dict[str, dict[int, Step]] = {}

    def load(self, run_id: str, *, first: int | None = None) -> DurableRun | None:
        """The run with its steps in order; with `first`, only the first so many (as if its process had died
        right after committing them)."""
        run = self.runs.get(run_id)
        if run is None:
            return None
        steps = [self.steps.get(run_id, {})[n] for n in sorted(self.steps.get(run_id, {}))]
        return replace(run, steps=steps if first is None else steps[:first])


class MemoryCheckpoints:
    """One process's view of the ledger: its writes are fenced by ownership, as the real stores' are."""

    def __init__(self, ledger: Ledger, owner: str = "p1") -> None:
        self.ledger = ledger
        self.owner = owner
        self.puts = 0
        self.looked = asyncio.Event()

    async def open(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    async def begin(self, run: DurableRun) -> None:
        if run.run_id not in self.ledger.runs:
            self.ledger.runs[run.run_id] = replace(run, owner=self.owner, steps=[])
        await asyncio.sleep(0)  # a commit is a wait

    async def put(self, step: Step) -> None:
        run = self.ledger.runs.get(step.run_id)
        if run is None or run.owner != self.owner:
            raise TakenOver(f"run {step.run_id} is owned by {run.owner if run else 'nobody'}, not {self.owner}")
        stored = replace(step, value=json.loads(json.dumps(step.value)))
        self.ledger.steps.setdefault(step.run_id, {}).setdefault(step.step_no, stored)
        self.puts += 1
        await asyncio.sleep(0)

    async def end(self, run_id: str, state: str) -> None:
        self.ledger.runs[run_id] = replace(self.ledger.runs[run_id], state=state)

    async def load(self, run_id: str) -> DurableRun | None:
        return self.ledger.load(run_id)

    async def release(self, run_id: str) -> None:
        self.ledger.runs[run_id] = replace(self.ledger.runs[run_id], owner="")

    def claim(self, run_id: str, *, first: int | None = None) -> DurableRun:
        """Take the run over (the fence: its old owner's writes are refused from now on), with its first `first`
        steps only when given: the rest are dropped, as if never committed."""
        if first is not None:
            steps = self.ledger.steps.get(run_id, {})
            self.ledger.steps[run_id] = {n: steps[n] for n in sorted(steps)[:first]}
        self.ledger.runs[run_id] = replace(self.ledger.runs[run_id], owner=self.owner)
        run = self.ledger.load(run_id)
        assert run is not None
        return run

    async def recover(self, resume: Callable[[DurableRun], Awaitable[None]]) -> None:
        for run_id, run in list(self.ledger.runs.items()):
            if run.state == "running" and run.owner in ("", self.owner):
                await resume(self.claim(run_id))
        self.looked.set()
