"""The shipper: sends the entries of the runs this process drives to their Redis streams, behind the runs' backs.

A run's driver appends to its in-process log and notes the run here (a dict insertion); one task per process ships
what is new of every noted run in one call of the `SHIP` script per round: one XADD a run for all its new events,
with the explicit id `0-<last seq>` and fields `f` (its first seq), `t` (their times) and `e` (a JSON array of them);
Redis refuses an id not above the stream's last, so no second writer can interleave seqs. With a run's first shipment
goes its whole record, TTLs, lease and place in its caller's run index (a run started without admission has none
yet); after that its hash is written only when its state changes, and once the run has ended and all of it is out,
the retention TTLs and the release of the caller's concurrency. A script runs atomically, so a reader that sees the
last event also sees the final state, and one that sees the first event sees the record.

One script call a round, rather than a MULTI/EXEC of the same commands: redis-py reads a transaction's replies one by
one (a `QUEUED` for each command, each under an asyncio timeout of its own), which cost the service more than the
commands themselves; a script call is one command and one reply, packed in C (`redis_client`).

One stream entry per event was the first design: redis-py spends ~0.1 ms of CPU packing and parsing each command,
which for an unpaced run cost several times the event's own cost on the loop (events/s fell by 10x); an entry per
round makes that cost per round, however many events it carries.

Under load a round waits longer than `linger_s`: at least `REST_PER_HELD` times as long as the round before held the
event loop (building its call, taking in its reply), at most `MAX_REST_S`. With 1000 paced runs started over a
second (bench/ship_rounds.py) a round came every ~20 ms with ~250 runs of one event each, held the loop ~2-6 ms
(up to 50 ms), and cost Redis an XADD a run: ~28 a run of 35 events. Rounds spaced by their own cost keep the
shipper's share of the loop bounded and carry more events an entry as the load grows. A round's runs are prepared
in slices of `SLICE` with a yield between them, so a large round does not hold the loop in one stretch; each run's
commands still go in one script call, which the guarantees above need.

Entries logged while Redis cannot be reached stay where they are, in the runs' logs (the buffer is those logs: no
copy, bounded by `runs.max_events_per_run` a run; `agent_state_unshipped_events` counts them). The shipper retries
with a backoff and, before it ships again, asks each stream how far it got: a reply lost with the connection, or a
Redis restarted empty, costs a re-send, never a gap.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from service import codec, telemetry
from service.state.mirror import SharedRun

if TYPE_CHECKING:
    import redis.asyncio as redis

    from service.run import Run
    from service.state.redis_layout import Layout

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20  # of events' JSON a round: bounds one script call (tool data can be 256 KiB an event)
BACKOFF_S = (0.05, 2.0)
REST_PER_HELD = 4  # a round waits this many times as long as the one before held the loop: <= 1/5 of the loop
MAX_REST_S = 0.05  # ... but no longer: how much later, under load, watchers elsewhere and durable streams see events
SLICE = 100  # runs prepared between two yields to the loop

# A round: for each run, its new events (XADD, id 0-<last seq>), its record when written (HSET); with its first
# shipment its TTLs while it runs, its lease on its caller's concurrency, its place in the caller's run index (ListRuns,
# scored by creation in µs, exact in a double unlike ns; the index loses the runs older than the TTL, whose records
# are gone, trimmed by one run in 16 (a random id ending in 0): the trim cost about as much as the rest of the index);
# once it ended, the retention TTLs and the lease given back. A first shipment that is also the last sets the
# retention at once and takes no lease. Errors are collected, not raised: one run's refused write (an XADD of seqs a
# lost reply's round already stored: "equal or smaller than the target stream top item") must not stop the others'.
# KEYS, per run: hash, stream, caller's active set, caller's run index[, idempotency key when `what` has k].
# ARGV: live TTL ms, lease ms, retention ms; then per run: id, last seq ('' for no events), first seq, times, events,
# what (r: first shipment, e: ended, k: idempotency key), created µs, n, n hash fields and values.
SHIP = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live, lease, keep = ARGV[1], tonumber(ARGV[2]), ARGV[3]
local refused = {}
local function call(...)
  local answer = redis.pcall(...)
  if type(answer) == 'table' and answer.err and not string.find(answer.err, 'equal or smaller', 1, true) then
    refused[#refused + 1] = answer.err
  end
end
local a, k = 4, 1
while a <= #ARGV do
  local id, last, what, n = ARGV[a], ARGV[a + 1], ARGV[a + 5], tonumber(ARGV[a + 7])
  local hash, stream, active, index = KEYS[k], KEYS[k + 1], KEYS[k + 2], KEYS[k + 3]
  local first, ended = string.find(what, 'r', 1, true), string.find(what, 'e', 1, true)
  k = k + 4
  if last ~= '' then call('XADD', stream, '0-' .. last, 'f', ARGV[a + 2], 't', ARGV[a + 3], 'e', ARGV[a + 4]) end
  if n > 0 then call('HSET', hash, unpack(ARGV, a + 8, a + 7 + n)) end
  if first then
    call('ZADD', index, ARGV[a + 6], id)
    if string.sub(id, -1) == '0' then call('ZREMRANGEBYSCORE', index, '-inf', (now - tonumber(live)) * 1000) end
    call('PEXPIRE', index, live)
  end
  if ended then
    call('PEXPIRE', hash, keep)
    call('PEXPIRE', stream, keep)
    if string.find(what, 'k', 1, true) then
      call('PEXPIRE', KEYS[k], keep)
      k = k + 1
    end
    call('ZREM', active, id)
  elseif first then
    call('PEXPIRE', hash, live)
    call('PEXPIRE', stream, live)
    call('ZADD', active, now + lease, id)
    call('PEXPIRE', active, lease)
  end
  a = a + 8 + n
end
return refused
"""


class Shipper:
    def __init__(
        self,
        client: redis.Redis,
        layout: Layout,
        *,
        failed: Callable[[str, BaseException], None],
        reached: Callable[[], None],
        settled: Callable[[Run], None],
        linger_s: float,
        lease_ms: int,
        clock: Callable[[], float] = time.perf_counter,
        pause: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        """`failed` and `reached` report each round to the store's health; `settled(run)` is told once all of an
        ended run is in Redis. A round waits `linger_s` for more events after the first: it costs ~0.3 ms of CPU
        whatever it carries, and an unpaced run logs an event every few microseconds; longer after a round that held the
        loop long (the module). `clock` times those rounds; `pause` is the wait before one (tests inject both)."""
        self.client = client
        self.layout = layout
        self._failed = failed
        self._reached = reached
        self._settled = settled
        self.linger_s = linger_s
        self.lease_ms = lease_ms
        self._clock = clock
        self._pause = pause
        self.held_s = 0.0  # how long the last round held the event loop, its slices together
        self.rest_s = 0.0  # how long the next round waits for more, beyond linger_s (see the module)
        self.pending: dict[str, Run] = {}
        self.shipped: dict[str, int] = {}  # run id -> seqs 1..n known to be in the stream
        self.recorded: dict[str, str] = {}  # run id -> the state its record in Redis says
        # a connection of its own for the rounds (one task sends them, one at a time): a call through the pool cost
        # ~410,000 instructions in redis-py and asyncio, on a held connection ~280,000 (callgrind)
        self._own = client.client()
        self._script = self._own.register_script(SHIP)
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

    def resync(self) -> None:
        """Ask Redis where each stream ends before the next round, and write the records anew: after it was out of
        reach it may have restarted empty."""
        self._resync = True

    def unshipped(self) -> int:
        return sum(len(run.log) - self.shipped.get(run_id, 0) for run_id, run in self.pending.items())

    async def flushed(self, within_s: float) -> bool:
        """Wait (up to `within_s`) until everything noted so far is in Redis; False when it is not."""
        try:
            await asyncio.wait_for(self._idle.wait(), within_s)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Give the shipper's connection back (after `run_forever` is stopped)."""
        await self._own.aclose()

    async def run_forever(self) -> None:
        backoff = BACKOFF_S[0]
        while True:
            await self._wake.wait()
            await self._pause(max(self.linger_s, self.rest_s))
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
        """After a failure: where each stream really ends (the last round may or may not have landed, and a
        Redis restarted without its data has nothing)."""
        layout = self.layout
        pipe = self.client.pipeline(transaction=False)
        ids = list(batch)
        for run_id in ids:
            pipe.xrevrange(layout.events_key(run_id), count=1)
        for run_id, last in zip(ids, await pipe.execute(), strict=True):
            self.shipped[run_id] = int(last[0][0].split(b"-")[1]) if last else 0
            self.recorded.pop(run_id, None)

    def _record(self, run: Run, last: int, done: bool) -> tuple[str, list[Any]]:
        """The run's record in this round: whole with its first shipment, then when its state changed (not with
        every shipment: an HSET less per run and round). The state it says, and the hash's fields and values."""
        state = self.layout.state_of(run, ended=done)
        if self.recorded.get(run.id) == state:
            return state, []
        fields = self.layout.fields_of(run, last, ended=done)
        return state, [part for pair in fields.items() for part in pair]

    async def _ship(self, batch: dict[str, Run]) -> list[Run]:
        """Ship one round (one call of `SHIP`); the runs with entries left over for the next."""
        layout = self.layout
        keys: list[Any] = []
        args: list[Any] = [layout.live_ttl_s * 1000, self.lease_ms, max(1000, int(layout.retention_s * 1000))]
        room = MAX_BYTES
        progress: list[tuple[Run, int, bool, str]] = []  # a run, its seqs in this round, whether it ends, its state
        left: list[Run] = []
        clock = self._clock
        began, held = clock(), 0.0
        for count, run in enumerate(batch.values(), 1):
            if count % SLICE == 0:  # let starts and streams waiting behind a large round go first (the module)
                held += clock() - began
                await asyncio.sleep(0)
                began = clock()
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
            done = last == len(run.log) and run.finished
            state, fields = self._record(run, last, done)
            what = ("r" if run.id not in self.recorded else "") + ("e" if done else "")
            keys += layout.ship_keys(run)
            if done and run.idempotency_key:
                what += "k"
                keys.append(layout.idem_key(run.caller, run.idempotency_key))
            if entries:
                # one stream entry for the run's new events, its id the last seq (see the module)
                times = ",".join([str(entry.time_ns) for entry in entries])
                args += (run.id, last, start + 1, times, encoded, what, run.created_ns // 1000, len(fields), *fields)
            else:
                args += (run.id, "", "", "", "", what, run.created_ns // 1000, len(fields), *fields)
            if not done and last < len(run.log):
                left.append(run)
            progress.append((run, last, done, state))
        if not keys:
            return left
        held += clock() - began
        refused = await self._script(keys=keys, args=args)
        began = clock()
        for refusal in refused:
            log.warning("the state store refused a write: %s", refusal.decode(errors="replace"))
        self._landed(progress)
        self.held_s = held + clock() - began
        self.rest_s = min(MAX_REST_S, self.held_s * REST_PER_HELD)
        return left

    def _landed(self, progress: list[tuple[Run, int, bool, str]]) -> None:
        """A round's transaction is in: each run's seqs up to `last` are stored (its streams may have them)."""
        for run, last, done, state in progress:
            if isinstance(run, SharedRun):
                run.mark_stored(last)
            if done:
                self.shipped.pop(run.id, None)
                self.recorded.pop(run.id, None)
                self._settled(run)
            else:
                self.shipped[run.id] = last
                self.recorded[run.id] = state
