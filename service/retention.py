"""Which ended runs the registry keeps watchable: for `retention_s` after they end, at most `max_retained_runs` of
them, and at most `max_retained_bytes` of their logs (a run whose tools returned megabytes keeps them until it is
forgotten), the oldest forgotten first. Runs it forgot are remembered by id for a while, so that WatchRun and GetRun
of one can say why it is gone rather than that it never was."""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

from service.config import RunsConfig

if TYPE_CHECKING:
    from service.run import Run

_REMEMBERED = 10_000  # forgotten runs whose reason is kept: about 1 MB


# An ended run as kept here: (run id, caller, when it ended on the registry's clock, its log's bytes). A plain tuple,
# not a named one: built with no call, and of atomic values, so that the collector stops tracking it (one tracked
# object less a kept run).
Ended = tuple[str, str, float, int]


class Retention:
    def __init__(self, config: RunsConfig) -> None:
        self.config = config
        self._ended: dict[str, Ended] = {}  # in the order they ended, oldest first
        self.bytes = 0
        self._forgotten: OrderedDict[str, tuple[str, str]] = OrderedDict()  # run id -> (caller, why)
        # how often the registry's janitor sweeps: often enough to keep a run about `retention_s`, at most 30 s
        self.interval_s = min(30.0, max(0.05, config.retention_s / 10))
        # the reasons a run is forgotten, made once and shared by every remembered run (a string each was a third
        # of what remembering one cost: ~90 of ~300 bytes, tracemalloc over 1,000 runs)
        self._whys = (
            f"it ended more than runs.retention_s = {config.retention_s:g} s ago",
            f"the server keeps at most runs.max_retained_runs = {config.max_retained_runs} ended runs",
            f"the ended runs' logs passed runs.max_retained_bytes = {config.max_retained_bytes // 2**20} MiB "
            "and it was among the oldest (runs whose tools return megabytes are kept for less time)",
        )

    def add(self, run_id: str, caller: str, at: float, size: int) -> bool:
        """A run ended at `at`, its log holding `size` bytes. True when the ended runs' logs are now over the byte
        budget: the registry sweeps at once then, as megabytes should not wait for the janitor's next round."""
        self._ended[run_id] = (run_id, caller, at, size)
        self.bytes += size
        return self.bytes > self.config.max_retained_bytes

    def sweep(self, now: float, runs: dict[str, Run], keys: dict[tuple[str, str], str]) -> int:
        """Forget the ended runs `over` their limits now: out of `runs`, and their idempotency `keys` (caller,
        key) with them. How many were forgotten."""
        drop = self.over(now, len(runs))
        for run_id in drop:
            run = runs.pop(run_id)
            if run.idempotency_key:
                keys.pop((run.caller, run.idempotency_key), None)
        return len(drop)

    def over(self, now: float, runs: int) -> list[str]:
        """The ids of the ended runs to forget now, oldest first: past their retention, or beyond the count (of all
        `runs` the registry holds, running ones included) or the byte budget. Each is forgotten once returned."""
        config = self.config
        excess = max(0, runs - config.max_retained_runs)
        drop: list[tuple[Ended, str]] = []
        kept_bytes = self.bytes
        old, many, big = self._whys
        for ended in self._ended.values():
            _, _, at, size = ended
            if now - at > config.retention_s:
                why = old
            elif len(drop) < excess:
                why = many
            elif kept_bytes > config.max_retained_bytes:
                why = big
            else:
                break  # the ones after it ended later: within every limit too
            drop.append((ended, why))
            kept_bytes -= size
        for ended, why in drop:
            self._forget(ended, why)
        return [ended[0] for ended, _ in drop]

    def _forget(self, ended: Ended, why: str) -> None:
        run_id, caller, _, size = ended
        del self._ended[run_id]
        self.bytes -= size
        self._forgotten[run_id] = (caller, why)
        if len(self._forgotten) > _REMEMBERED:
            self._forgotten.popitem(last=False)

    def why_forgotten(self, run_id: str, caller: str | None) -> str | None:
        """Why this caller's run `run_id` was forgotten, if it was (recently); None for another caller's run."""
        entry = self._forgotten.get(run_id)
        if entry is None or (caller is not None and entry[0] != caller):
            return None
        return entry[1]
