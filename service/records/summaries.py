"""Run summaries: what `GetRun` answers for a run after the live state forgot it (Redis keeps a run's events for
`runs.retention_s`; the records database keeps its summary for as long as records are kept). Written once, when a
run ends, by the replica that drove it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from service import events as ev


@dataclass(frozen=True, kw_only=True, slots=True)
class RunSummary:
    run_id: str
    caller: str
    state: str  # a RunState value: succeeded, failed, cancelled
    last_seq: int
    created_ns: int
    ended_ns: int
    outcome: ev.FinalResponse | ev.RunFailed | None
    trace_id: str = ""


class RunSummaryStore(Protocol):
    async def put(self, summary: RunSummary) -> None:
        """Keep `summary`; a second put of the same run changes nothing (a handed-over run may end twice)."""

    async def get(self, run_id: str) -> RunSummary | None: ...
