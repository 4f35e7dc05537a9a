"""What the loop and the registry need of the checkpoint store, and what a checkpoint is. The store is chosen by the
composition root from `records.url` (SQLite file by default, PostgreSQL for a fleet); nothing here knows which."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

StepKind = Literal["turn", "tool", "intent", "asked", "decided"]
"""`turn`: a model turn's result (its TurnEnd: content blocks, stop reason, usage) — never requested again once
recorded. `tool`: a tool call's result (the ToolResult as the model gets it) — never run again. `intent`: written and
committed before an unsafe tool call starts; an intent with no `tool` step after it means the call may have happened
(OUTCOME_UNKNOWN on recovery). `asked`: a call's approval was requested (with its deadline), before the run waits
for it; `decided`: its decision, before the call goes on (docs/interactive.md, Durability)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Step:
    run_id: str
    step_no: int  # 1, 2, 3… per run, in the order the run recorded them
    kind: StepKind
    key: str  # what the step is of: "turn:3", "call:toolu_01…": replay finds a step by it
    value: dict[str, Any]  # JSON-able; events through service/codec
    seq: int = 0  # the run's last event seq when the step was recorded (recovery resumes the log after it)


@dataclass(frozen=True, kw_only=True, slots=True)
class DurableRun:
    run_id: str
    caller: str
    owner: str  # the process (executor id) that drives it; "" while handed over and not yet claimed
    state: str  # "running" until the run ends; then its RunState value
    request: dict[str, Any]  # the RunSpec as JSON, to rebuild the run elsewhere
    background: bool = False
    steps: list[Step] = field(default_factory=list)
    created: float = 0.0  # wall time of its first start (0: unknown): a resumed run keeps its deadline from it


class ExecutorIdInUse(RuntimeError):
    """Another live process holds this executor id (two processes on one data_dir need ids of their own)."""


class TakenOver(Exception):
    """The store refused a write: another process owns the run now (this one was thought dead). The run must stop at
    once and emit nothing more: its new owner continues it."""


class CheckpointStore(Protocol):
    owner: str  # this process's executor id
    looked: asyncio.Event  # set once `recover` has made its first look (and resumed what it claimed)

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    async def begin(self, run: DurableRun) -> None:
        """Record the run as owned by this process; returns once committed. A run id already there is not replaced."""

    async def put(self, step: Step) -> None:
        """Record `step`; returns once committed (batched with other runs' steps). Idempotent on (run_id, step_no).
        Raises TakenOver when this process no longer owns the run."""

    async def end(self, run_id: str, state: str) -> None:
        """Record the run's final state; returns once committed. Fenced like `put`: raises TakenOver when this
        process no longer owns the run (its new owner ends it)."""

    async def load(self, run_id: str) -> DurableRun | None:
        """The run and its steps, in step order."""

    async def release(self, run_id: str) -> None:
        """Give the run up (drain): owner cleared, so a peer claims it at once (this process's own `recover` never
        takes it back; its next start may). Nothing happens for a run this process does not own."""

    async def recover(self, resume: Callable[[DurableRun], Awaitable[None]]) -> None:
        """Run until cancelled: hand `resume` every running run this process should continue — its own left from
        before a restart (same owner id), those released by a draining peer, and those of a peer found dead — each
        claimed first (the claim is the fence: the old owner's writes are refused from then on). `resume` is awaited
        for one run after the other: it starts the run (a task of its own) and returns."""


@runtime_checkable
class DurableQueue(Protocol):
    """A checkpoint store that also keeps the fleet's queue of durable SubmitRun runs (PostgreSQL): a queued run is a
    `durable_runs` row in state "queued" with no owner, until a process with a free slot claims it (state "running",
    owner itself) and drives it as it would continue a run; from then on the dead-peer recovery covers it. A store
    without it (SQLite, one node) leaves SubmitRun on the process's own queue."""

    queue_wake: asyncio.Event  # set when a peer enqueued (NOTIFY); the queue's user sets it too (a slot freed here)

    async def enqueue(self, run: DurableRun, *, limit: int) -> bool:
        """Queue `run` (state "queued", owner ""); returns once committed and announced. False, and nothing
        written, when `limit` runs are queued already (fleet-wide)."""

    async def queued(self) -> int:
        """How many runs are queued (fleet-wide)."""

    async def claim_queued(self, count: int, *, max_running: int | None = None) -> list[DurableRun]:
        """Claim up to `count` queued runs, oldest first, for this process (each claimed by one process only); with
        `max_running`, no more than keeps the fleet's running background runs at most that many."""

    async def queue_position(self, run_id: str) -> int:
        """The run's place in the queue, 1 for the next to be claimed; 0 when it is not queued."""

    async def cancel_queued(self, run_id: str) -> bool:
        """End a queued run as cancelled before any process claims it; False when it is not queued (any more)."""

    def resume_later(self, run_id: str) -> None:
        """A run claimed here that could not start now: `recover` continues it at its next look."""
