"""Runs another process drives, as this one reads them from Redis: their records (GetRun, ListRuns), mirrors that
the one blocking reader (`redis_watch.StreamReader`) fills for their watchers here, and cancel requests and
interaction messages carried to the process that drives them."""

from __future__ import annotations

import asyncio
import functools
import heapq
import json
import secrets
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from service import events as ev
from service.config import StateConfig
from service.errors import AgentError, RunInterrupted, StateUnavailable
from service.listing import RunQuery, key_of
from service.run import Run, RunRecord
from service.state.mirror import MirrorRun
from service.state.redis_client import CANCEL, READ
from service.state.redis_layout import Layout, log_entries, run_record, stream_entries
from service.state.redis_watch import READ_COUNT, Entries, Follow, StreamReader

if TYPE_CHECKING:
    import redis.asyncio as redis

ENDED = (b"succeeded", b"failed", b"cancelled")
QUEUED = b"queued"


class RemoteRuns:
    def __init__(
        self,
        config: StateConfig,
        layout: Layout,
        client: redis.Redis,
        reader: redis.Redis,
        *,
        call: Callable[[Awaitable[Any]], Awaitable[Any]],
        failed: Callable[[str, BaseException], None],
    ) -> None:
        """`reader` for blocking reads; `call(request)` makes a caller's request of Redis (its failure is the
        store's: `StateUnavailable`), `failed` reports one of the background reads'."""
        self.config = config
        self.layout = layout
        self.client = client
        self.reader = reader
        self._call = call
        self.failed = failed
        self.watch = StreamReader(
            client,
            reader,
            block_s=config.read_block_s,
            retry_s=config.probe_s,
            failed=failed,
            quiet=self._check_quiet,
        )
        self._read = client.register_script(READ)
        self._cancel = client.register_script(CANCEL)
        self._mirrors: dict[str, MirrorRun] = {}  # by their stream's key

    async def record(self, run_id: str) -> RunRecord | None:
        """The run's record; if there is none yet, what its first shipment brings within `state.record_wait_s` (a
        run started without admission on another replica a moment ago)."""
        record = await self._record_now(run_id)
        wait_s = self.config.record_wait_s
        if record is None and wait_s > 0:
            await self.watch.appeared(self.layout.events_key(run_id), wait_s)
            record = await self._record_now(run_id)  # read again whatever the wait saw: the run may be mirrored now
        return record

    async def _record_now(self, run_id: str) -> RunRecord | None:
        answer = await self._call(self._read(keys=[self.layout.run_key(run_id), self.layout.events_key(run_id)]))
        record = _read_record(run_id, answer)
        return None if record is None else (await self._as_left([(record, _unkept(answer))]))[0]

    async def _as_left(self, read: list[tuple[RunRecord, bool]]) -> list[RunRecord]:
        """The records as their runs stand: a run that is not durable, whose record says running while no process
        holds its lease any more (its replica died, or lost Redis for longer than the lease), will never go on or
        end anywhere (no process continues it, unlike a durable one), so it reads as failed, UNAVAILABLE. Its record
        is left as it is: it expires as the records of a dead process's runs do."""
        suspects = [record for record, unkept in read if unkept and record.state == "running"]
        if not suspects:
            return [record for record, _ in read]
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        for record in suspects:
            pipe.zscore(self.layout.caller_key(record.caller, "active"), record.run_id)
        (seconds, micros), *expiries = await self._call(pipe.execute())
        now_ms = seconds * 1000 + micros // 1000
        left = {r.run_id for r, expiry in zip(suspects, expiries, strict=True) if not _leased(expiry, now_ms)}
        return [_left(record) if record.run_id in left else record for record, _ in read]

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """From the caller's run index, newest first, in batches until the page is full: a state filter may skip
        many, and a run whose record expired is skipped (its summary answers for it)."""
        index = self.layout.caller_key(query.caller, "runs")
        top: str | int = "+inf" if query.before is None else query.before[0] // 1000  # the same µs: filtered below
        batch = max(2 * query.limit, 32)
        found: list[RunRecord] = []
        offset = 0
        while len(found) < query.limit:
            ids = await self._call(
                self.client.zrange(index, top, "-inf", desc=True, byscore=True, offset=offset, num=batch)
            )
            if not ids:
                break
            offset += len(ids)
            pipe = self.client.pipeline(transaction=False)
            names = [raw.decode() for raw in ids]
            for run_id in names:
                # the script's text, not its sha: a Redis restarted since `start` would answer NOSCRIPT in a pipeline
                pipe.eval(READ, 2, self.layout.run_key(run_id), self.layout.events_key(run_id))
            read = [
                (record, _unkept(answer))
                for run_id, answer in zip(names, await self._call(pipe.execute()), strict=True)
                if (record := _read_record(run_id, answer)) is not None
            ]
            found.extend(record for record in await self._as_left(read) if query.admits(record))
            if len(ids) < batch:
                break
        return heapq.nlargest(query.limit, found, key=key_of)

    async def mirror(self, record: RunRecord) -> Run:
        key = self.layout.events_key(record.run_id)
        mirror = self._mirrors.get(key)
        if mirror is None:
            mirror = self._mirrors[key] = MirrorRun(record)
            self.watch.follow(key, 0, functools.partial(self._fill, mirror))
        return mirror

    def give_up_all(self, why: Callable[[str], AgentError]) -> None:
        """End every mirror's followers with `why(run_id)` (this process stops), once they have read what is here."""
        for mirror in list(self._mirrors.values()):
            mirror.give_up(why(mirror.id))
            self._unfollow(mirror)

    def _fill(self, mirror: MirrorRun, entries: Entries) -> None:
        mirror.extend([entry for _, fields in entries for entry in log_entries(fields)])
        if mirror.finished or mirror.lost is not None:
            self._unfollow(mirror)

    def _unfollow(self, mirror: MirrorRun) -> None:
        key = self.layout.events_key(mirror.id)
        self.watch.stop(key)
        self._mirrors.pop(key, None)

    async def _check_quiet(self, follows: list[Follow]) -> None:
        """The mirrors whose streams were quiet for a blocking read: each is given up if no process holds its run's
        lease any more (its driver died, or lost Redis for longer than the lease)."""
        mirrors = [mirror for follow in follows if (mirror := self._mirrors.get(follow.key)) is not None]
        if not mirrors:
            return
        pipe = self.client.pipeline(transaction=False)
        pipe.time()
        for mirror in mirrors:
            pipe.zscore(self.layout.caller_key(mirror.caller, "active"), mirror.id)
            pipe.hget(self.layout.run_key(mirror.id), "state")
        try:
            (seconds, micros), *answers = await pipe.execute()
        except (RedisError, OSError) as exc:
            self.failed("watch", exc)
            return
        now_ms = seconds * 1000 + micros // 1000
        for mirror, expiry, state in zip(mirrors, answers[::2], answers[1::2], strict=True):
            if state in ENDED or state == QUEUED or _leased(expiry, now_ms):
                continue  # ended (its last events are on their way), still driven, or waiting in the durable queue
            mirror.give_up(
                RunInterrupted(
                    f"run {mirror.id} stopped at seq {len(mirror.log)}: the replica that drove it stopped "
                    "renewing its lease (it died or lost Redis for longer than the lease)"
                )
            )
            self._unfollow(mirror)

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        mode = "after_turn" if after_turn else "now"
        channels = self.layout.channel("")
        await self._call(self._cancel(keys=[self.layout.run_key(record.run_id)], args=[mode, channels, record.run_id]))
        if wait_s > 0:
            await self._until_ended(record, wait_s)
        return await self.record(record.run_id) or record

    async def deliver(self, record: RunRecord, message: dict[str, Any], *, wait_s: float = 2.0) -> dict[str, str]:
        """Carry `message` to the process driving the run (on its control channel) and wait for its answer, on a
        list of its own: empty when applied, else the refusal's code and message."""
        reply_key = self.layout.reply_key(secrets.token_hex(8))
        payload = json.dumps(message, separators=(",", ":"))
        channel = self.layout.channel(record.owner)
        heard = await self._call(self.client.publish(channel, f"{record.run_id} interact {reply_key} {payload}"))
        if not heard:
            raise StateUnavailable(f"the replica driving run {record.run_id} is not listening; retry shortly")
        answer = await self._call(self.reader.blpop([reply_key], timeout=wait_s))
        if answer is None:
            raise StateUnavailable(f"the replica driving run {record.run_id} did not answer within {wait_s:g} s")
        reply: dict[str, str] = json.loads(answer[1])
        return reply

    async def _until_ended(self, record: RunRecord, wait_s: float) -> None:
        """Wait (up to `wait_s`) for the run's last event, reading its stream from where the record left it."""
        deadline = asyncio.get_running_loop().time() + wait_s
        last: str | bytes = f"0-{record.last_seq}"
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            answer = await self._call(
                self.reader.xread(
                    {self.layout.events_key(record.run_id): last}, count=READ_COUNT, block=max(1, int(left * 1000))
                )
            )
            entries = stream_entries(answer)
            if not entries:
                return
            last = entries[-1][0]
            if isinstance(log_entries(entries[-1][1])[-1].event, ev.FinalResponse | ev.RunFailed):
                return


def _leased(expiry: Any, now_ms: int) -> bool:
    """Whether a run's lease (its score in its caller's active set, ms on Redis's clock) still holds: a process
    drives it."""
    return expiry is not None and float(expiry) > now_ms


def _unkept(answer: Any) -> bool:
    """Whether the READ script's answer is the record of a run that is not durable (a record written before the
    field existed says nothing, and is taken as durable: it is never declared failed)."""
    if not answer:
        return False
    flat = answer[0]
    return dict(zip(flat[::2], flat[1::2], strict=True)).get(b"durable") == b"0"


def _left(record: RunRecord) -> RunRecord:
    return record._replace(
        state="failed",
        outcome=ev.RunFailed(
            code="UNAVAILABLE",
            message=(
                f"run {record.run_id} stopped at seq {record.last_seq}: the replica that drove it stopped renewing "
                "its lease (it died or lost Redis for longer than the lease), and a run that is not durable is not "
                "continued elsewhere; start it again"
            ),
            retryable=True,
        ),
    )


def _read_record(run_id: str, answer: Any) -> RunRecord | None:
    """A record from the READ script's answer (None: no record)."""
    if not answer:
        return None
    flat, last = answer
    record = run_record(run_id, dict(zip(flat[::2], flat[1::2], strict=True)))
    if last:  # the stream is current, the record's last_seq only as of its last change of state
        record = record._replace(last_seq=max(record.last_seq, int(last.split(b"-")[1])))
    return record
