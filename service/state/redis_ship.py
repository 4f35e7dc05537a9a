"""The shipper: sends the entries of the runs this process drives to their Redis streams, behind the runs' backs.

A run's driver appends to its in-process log and notes the run here (a dict insertion); one task per process ships
what is new of every noted run in one MULTI/EXEC per round: one XADD a run for all its new events, with the explicit
id `0-<last seq>` and fields `f` (its first seq), `t` (their times) and `e` (a JSON array of them); Redis refuses an
id not above the stream's last, so no second writer can interleave seqs. Then the run's hash (state, last seq) and,
once the run has ended and all of it is out, the retention TTLs and the release of the caller's concurrency. Stream
and hash change in one transaction, so a reader that sees the last event also sees the final state.

One stream entry per event was the first design: redis-py spends ~0.1 ms of CPU packing and parsing each command,
which for an unpaced run cost several times the event's own cost on the loop (events/s fell by 10x); an entry per
round makes that cost per round, however many events it carries.

Entries logged while Redis cannot be reached stay where they are, in the runs' logs (the buffer is those logs: no
copy, bounded by `runs.max_events_per_run` a run; `agent_state_unshipped_events` counts them). The shipper retries
with a backoff and, before it ships again, asks each stream how far it got: a reply lost with the connection, or a
Redis restarted empty, costs a re-send, never a gap.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from redis.exceptions import RedisError, ResponseError

from service import codec, telemetry
from service.state.mirror import SharedRun

if TYPE_CHECKING:
    import redis.asyncio as redis

    from service.run import Run
    from service.state.redis_layout import Layout

log = logging.getLogger(__name__)

# A round waits this long for more events after the first: a round costs ~0.3 ms of CPU whatever it carries, and an
# unpaced run logs an event every few microseconds; watchers elsewhere see events this much later.
LINGER_S = 0.005
MAX_BYTES = 1 << 20  # of events' JSON a round: bounds one transaction (tool data can be 256 KiB an event)
BACKOFF_S = (0.05, 2.0)


class Shipper:
    def __init__(
        self,
        client: redis.Redis,
        layout: Layout,
        *,
        failed: Callable[[str, BaseException], None],
        reached: Callable[[], None],
        settled: Callable[[Run], None],
    ) -> None:
        """`failed` and `reached` report each round to the store's health; `settled(run)` is told once all of an
        ended run is in Redis."""
        self.client = client
        self.layout = layout
        self._failed = failed
        self._reached = reached
        self._settled = settled
        self.pending: dict[str, Run] = {}
        self.shipped: dict[str, int] = {}  # run id -> seqs 1..n known to be in the stream
        self._wake = asyncio.Event()
        self._resync = False
        self._idle = asyncio.Event()
        self._idle.set()

    def note(self, run: Run) -> None:
        """`run` has new entries, or ended. Called by the driver for every event: a dict insertion, no await."""
        self.pending[run.id] = run
        if not self._wake.is_set():
            self._wake.set()
            self._idle.clear()

    def note_all(self, runs: Iterable[Run]) -> None:
        for run in runs:
            self.note(run)

    def unshipped(self) -> int:
        return sum(len(run.log) - self.shipped.get(run_id, 0) for run_id, run in self.pending.items())

    async def flushed(self, within_s: float) -> bool:
        """Wait (up to `within_s`) until everything noted so far is in Redis; False when it is not."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def run_forever(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            await self._wake.wait()
            await asyncio.sleep(LINGER_S)
            self._wake.clear()
            batch, self.pending = self.pending, {}
            try:
                if self._resync:
                    await self._catch_up(batch)
                    self._resync = False
                more = await self._ship(batch)
            except (RedisError, OSError) as exc:
                for run_id, run in batch.items():
                    self.pending.setdefault(run_id, run)
                self._resync = True
                telemetry.STATE_UNSHIPPED.set(self.unshipped())
                self._failed("ship", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, BACKOFF_S[1])
                self._wake.set()
                continue
            backoff = BACKOFF_S[0]
            self._reached()
            for run in more:
                self.pending.setdefault(run.id, run)
            if self.pending:
                self._wake.set()
            else:
                telemetry.STATE_UNSHIPPED.set(0)
                self._idle.set()

    async def _catch_up(self, batch: dict[str, Run]) -> None:
        """After a failure: where each stream really ends (the last transaction may or may not have landed, and a
        Redis restarted without its data has nothing)."""
        layout = self.layout
        pipe = self.client.pipeline(transaction=False)
        ids = list(batch)
        for run_id in ids:
            pipe.xrevrange(layout.events_key(run_id), count=1)
        for run_id, last in zip(ids, await pipe.execute(), strict=True):
            self.shipped[run_id] = int(last[0][0].split(b"-")[1]) if last else 0

    async def _ship(self, batch: dict[str, Run]) -> list[Run]:
        """Ship one round; the runs with entries left over for the next."""
        layout = self.layout
        pipe = self.client.pipeline(transaction=True)
        room = MAX_BYTES
        progress: list[tuple[Run, int, bool]] = []  # a run, its seqs in this round's transaction, whether it ends
        left: list[Run] = []
        for run in batch.values():
            if room <= 0:
                left.append(run)
                continue
            start = self.shipped.get(run.id, 0)
            entries = run.log[start:]
            if run.bytes > MAX_BYTES:  # big tool data in this run: the round is bounded by size, event by event
                parts = []
                for entry in entries:
                    parts.append(codec.dumps(entry.event))
                    room -= len(parts[-1])
                    if room <= 0:
                        break
                entries = entries[: len(parts)]
                encoded = b"[" + b",".join(parts) + b"]"
            elif entries:
                encoded = codec.dumps_many([entry.event for entry in entries])
                room -= len(encoded)
            last = start + len(entries)
            events_key = layout.events_key(run.id)
            if entries:
                # one stream entry for the run's new events, its id the last seq (see the module)
                times = ",".join([str(entry.time_ns) for entry in entries])
                pipe.xadd(events_key, {"f": start + 1, "t": times, "e": encoded}, id=f"0-{last}")
            done = last == len(run.log) and run.finished
            pipe.hset(layout.run_key(run.id), mapping=layout.fields_of(run, last, ended=done))
            if done:
                layout.ended_commands(pipe, run)
            else:
                pipe.expire(events_key, layout.live_ttl_s)  # a stream whose driver dies is forgotten too
                if last < len(run.log):
                    left.append(run)
            progress.append((run, last, done))
        for result in await pipe.execute(raise_on_error=False):
            if isinstance(result, ConnectionError | TimeoutError):
                raise result
            # "equal or smaller than the target stream top item": already there (a retried transaction)
            if isinstance(result, ResponseError) and "equal or smaller" not in str(result):
                log.warning("the state store refused a write: %s", result)
        self._landed(progress)
        return left

    def _landed(self, progress: list[tuple[Run, int, bool]]) -> None:
        """A round's transaction is in: each run's seqs up to `last` are stored (its streams may have them)."""
        for run, last, done in progress:
            if isinstance(run, SharedRun):
                run.mark_stored(last)
            if done:
                self.shipped.pop(run.id, None)
                self._settled(run)
            else:
                self.shipped[run.id] = last
