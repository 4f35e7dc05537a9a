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

if TYPE_CHECKING:
    from service.control import RunControl
    from service.loop import RunSpec
    from service.run import Run, RunRecord


class Admission(NamedTuple):
    """The store's answer to a new run: `existing` names the run this caller's idempotency key already started;
    `refused` says which of the caller's quotas refuses it; neither: the run is recorded and counted."""

    existing: str = ""
    refused: str = ""


class RunStore(Protocol):
    """A run-state store shared by the replicas. Every method may raise `StateUnavailable` when the store cannot be
    reached, except `shipped`, which never wait on it (the driving process ships in the background)."""

    instance: str  # this process's id, written as the owner of the runs it drives
    up: bool  # False while the store cannot be reached (health, metrics)

    def on_cancel(self, callback: Callable[[str, bool], None]) -> None:
        """Call `callback(run_id, after_turn)` when another replica asks to cancel a run this process drives."""

    def on_message(self, callback: Callable[[str, dict[str, Any]], dict[str, str]]) -> None:
        """Call `callback(run_id, message)` for an interaction message (`deliver`) for a run this process drives;
        its return value (empty, or a refusal's code and message) is the answer."""

    async def deliver(self, record: RunRecord, message: dict[str, Any], *, wait_s: float = 2.0) -> dict[str, str]:
        """Carry `message` to the process driving the run; its answer (StateUnavailable when none comes)."""

    async def admit(self, run: Run, *, key: str, fingerprint: str, limits: CallerConfig) -> Admission:
        """Atomically: the run this caller's key names, if any; else the caller's quotas; else record `run`."""

    def new_run(self, spec: RunSpec, control: RunControl, *, caller: str, key: str, fingerprint: str) -> Run:
        """A run to drive here whose log the store ships, in the background, as it grows (never waiting on it)."""

    async def record(self, run_id: str) -> RunRecord | None: ...

    async def mirror(self, record: RunRecord) -> Run:
        """A `Run` whose log is filled from the store: the same entries and seqs the driving process logged."""

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        """Ask the driving process to cancel; wait up to `wait_s` for the run to end and return its record."""

    async def close(self) -> None: ...
