"""The run-state store: what the registry needs from state shared by every replica, so that any of them answers
`GetRun`, `WatchRun` and `CancelRun` for any run, and idempotency keys and caller quotas hold for the fleet.

With `state.url: memory://` the registry has no store and keeps all of it in this process, as it always did (no
network, nothing added per event). A shared store (`redis_runs.RedisRunStore`) keeps, for each run, a record (state,
caller, owning process, timestamps, request fingerprint) and its event log; the process that drives a run keeps its
own log in memory as well and ships the entries to the store behind its back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from service.config import CallerConfig
from service.errors import AgentError

if TYPE_CHECKING:
    from service.control import RunControl
    from service.listing import RunQuery
    from service.loop import RunSpec
    from service.run import Run, RunRecord


class Admission(NamedTuple):
    """The store's answer to a new run: `existing` names the run this caller's idempotency key already started;
    `refused` says which of the caller's quotas refuses it; neither: the run is recorded and counted."""

    existing: str = ""
    refused: str = ""


class RunLookup(Protocol):
    """Where the registry finds the runs it does not hold: the shared store (another replica drives them), or the
    embedded default's run log (`sqlite_runs.SqliteRunLog`: a durable run this process drove before a restart)."""

    async def record(self, run_id: str) -> RunRecord | None:
        """The run's record; none yet: a shared store waits briefly for one shipped with a just-started run's first
        events."""

    async def mirror(self, record: RunRecord) -> Run:
        """A `Run` whose log is filled from the store: the same entries and seqs the driving process logged."""

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        """Ask the driving process to cancel; wait up to `wait_s` for the run to end and return its record."""

    async def close(self) -> None: ...


class RunKeeper(RunLookup, Protocol):
    """A store that keeps runs' logs beyond this process, from which a durable run it claims goes on."""

    async def revive(self, spec: RunSpec, control: RunControl, *, caller: str) -> Run | str:
        """A durable run claimed from a process that stopped, to drive here from now on: its log holds the events
        the store has of it (seqs 1..n; empty when the store has none), and new ones are kept after them. Or the
        run's final state when the store has its end already."""

    async def flushed(self, within_s: float) -> bool:
        """Wait (up to `within_s`) until what this process logged is in the store; False when it is not."""

    async def mark_cancel(self, run_id: str, *, after_turn: bool) -> None:
        """Keep a CancelRun of a durable run this process drives, so that a process that revives the run after this
        one died stops it as asked (`revive` reads it). An AFTER_TURN mark never replaces an IMMEDIATE one."""


class RunStore(RunKeeper, Protocol):
    """A run-state store shared by the replicas. Every method may raise `StateUnavailable` when the store cannot be
    reached, except `shipped`, which never wait on it (the driving process ships in the background)."""

    instance: str  # this process's id, written as the owner of the runs it drives
    up: bool  # False while the store cannot be reached (health, metrics)

    def stop_watching(self, why: Callable[[str], AgentError]) -> None:
        """This process stops: the streams here that follow runs other processes drive end with `why(run_id)`
        once they have sent what they have, rather than being cut by the server's stop."""

    def on_cancel(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(run_id, after_turn)` when another replica asks to cancel a run this process drives."""

    def on_message(self, callback: Callable[[str, dict[str, Any]], dict[str, str]]) -> None:
        """Call `callback(run_id, message)` for an interaction message (`deliver`) for a run this process drives;
        its return value (empty, or a refusal's code and message) is the answer."""

    async def deliver(self, record: RunRecord, message: dict[str, Any], *, wait_s: float = 2.0) -> dict[str, str]:
        """Carry `message` to the process driving the run; its answer (StateUnavailable when none comes)."""

    async def admit(self, run: Run, *, key: str, fingerprint: str, limits: CallerConfig) -> Admission:
        """Atomically: the run this caller's key names, if any; else the caller's quotas; else record `run` (with no
        key and no quota, nothing is checked: the store may record it with its first events)."""

    def new_run(self, spec: RunSpec, control: RunControl, *, caller: str, key: str, fingerprint: str) -> Run:
        """A run to drive here whose log the store ships, in the background, as it grows (never waiting on it)."""

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """ListRuns' runs the store still keeps (live, or ended within retention), newest first."""

    def forget(self, run: Run) -> None:
        """Stop keeping `run` here (its lease, its shipping): it waits in the durable queue for whichever process
        claims it. Called once its log is in the store."""
