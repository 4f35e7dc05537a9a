"""Runs shared through Redis (`state.url: redis://…`): any replica answers GetRun, WatchRun and CancelRun for any
run, and idempotency keys and caller quotas hold for the fleet. Its keys, and how long they are kept:
`redis_layout.py`. A dead process's runs stop counting against their caller's concurrency when their leases
(`state.lease_s`, renewed by the owner every third of it) run out.

A run with an idempotency key or a caller with quotas is admitted by one script before it starts (a round trip
before the first event). Any other run starts at once: nothing needs checking, and its record goes to Redis with its
first shipment; a replica asked about it before that lands waits for it (`state.record_wait_s`).

Runs another process drives are read through `redis_remote.RemoteRuns`: watchers on this replica share one mirror
per run (`MirrorRun`), and all mirrors one blocking reader (`redis_watch.StreamReader`): the history first, then
live entries as they are added. No polling.

Redis unreachable: runs in flight keep going and are shipped when it is back (`redis_ship.Shipper`); new runs, and
calls about runs this process does not drive, are refused with UNAVAILABLE (`StateUnavailable`); the store is marked
down (log line, `agent_state_store_up` 0, the health service `agent.v1.StateStore` NOT_SERVING) until a probe or a
write reaches it again, which it tries every `state.probe_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from redis.exceptions import RedisError

from service import telemetry
from service.aio import cancel_and_wait
from service.config import CallerConfig, StateConfig
from service.control import RunControl, stop_as_marked
from service.errors import AgentError, StateUnavailable
from service.listing import RunQuery
from service.loop import RunSpec
from service.run import Run, RunRecord
from service.state.base import Admission
from service.state.mirror import SharedRun
from service.state.redis_client import ADMIT, MARK, READ, RENEW, TAKE, connect
from service.state.redis_layout import Layout, log_entries, run_record
from service.state.redis_remote import RemoteRuns
from service.state.redis_ship import Shipper

log = logging.getLogger(__name__)

REPLY_TTL_S = 30  # an answer nobody took (its asker gave up) is gone after this


class RedisRunStore:
    def __init__(
        self, config: StateConfig, *, retention_s: float, max_run_s: float, on_health: Callable[[bool], Awaitable[None]]
    ) -> None:
        self.instance = secrets.token_hex(6)
        self.layout = Layout(
            config.prefix, self.instance, retention_s=retention_s, live_ttl_s=max(1, int(max_run_s + retention_s))
        )
        self.config = config
        self.client = connect(config)
        # blocking reads and pub/sub
        self.reader = connect(config, read_timeout_s=config.read_block_s + config.timeout_s)
        self.up = True
        self.lease_ms = int(config.lease_s * 1000)
        self.shipper = Shipper(
            self.client,
            self.layout,
            failed=self.failed,
            reached=self.reached,
            settled=self.settled,
            linger_s=config.ship_linger_s,
            lease_ms=self.lease_ms,
        )
        self.remote = RemoteRuns(config, self.layout, self.client, self.reader, call=self._call, failed=self.failed)
        self.watch = self.remote.watch
        self._on_health = on_health
        self._on_cancel: Callable[[str, bool], None] = lambda run_id, after_turn: None
        self._on_message: Callable[[str, dict[str, Any]], dict[str, str]] = lambda run_id, message: {
            "code": "UNAVAILABLE",
            "message": "this replica takes no messages for runs",
        }
        self._admit = self.client.register_script(ADMIT)
        self._renew = self.client.register_script(RENEW)
        self._take = self.client.register_script(TAKE)
        self._mark = self.client.register_script(MARK)
        self._renew_now = False
        self._live: dict[str, Run] = {}  # runs driven here, not yet settled in the store
        self._tasks: set[asyncio.Task[Any]] = set()

    # lifecycle

    async def start(self) -> None:
        try:
            await self.client.ping()
            # loaded ahead: Redis takes an EVALSHA it does not know for a write (held while writes are paused)
            await self.client.script_load(READ)
        except (RedisError, OSError) as exc:
            self.failed("connect", exc)  # serve anyway: the probe reconnects, runs are refused until then
        else:
            telemetry.STATE_UP.set(1)
        jobs = (
            ("shipper", self.shipper.run_forever),
            ("control", self._listen),
            ("probe", self._probe),
            ("reader", self.watch.run_forever),
        )
        for name, job in jobs:
            self._spawn(job(), f"state store {name}")

    async def close(self, flush_s: float = 5.0) -> None:
        """Ship what is left (up to `flush_s`), then stop the store's tasks and connections."""
        if not await self.shipper.flushed(flush_s):
            log.warning("closing with events not shipped", extra={"unshipped": self.shipper.unshipped()})
        await cancel_and_wait(list(self._tasks), 5.0)
        await self.watch.close()
        await self.shipper.close()
        await self.client.aclose()
        await self.reader.aclose()

    def _spawn(self, job: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.ensure_future(job)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # health

    def failed(self, what: str, exc: BaseException) -> None:
        telemetry.STATE_ERRORS.inc()
        if self.up:
            self.up = False
            telemetry.STATE_UP.set(0)
            log.warning(
                "state store unreachable: runs in flight go on, new runs are refused until it is back",
                extra={"operation": what, "error": str(exc) or type(exc).__name__},
            )
            self._spawn(self._on_health(False), "state store health")

    def reached(self) -> None:
        if not self.up:
            self.up = True
            telemetry.STATE_UP.set(1)
            log.info("state store reachable again")
            self._spawn(self._on_health(True), "state store health")
            self.shipper.resync()
            self.shipper.note_all(self._live.values())
            self._renew_now = True  # a Redis restarted empty has lost the leases: at the probe's next round

    def _unavailable(self, exc: BaseException | None = None) -> StateUnavailable:
        if exc is not None:
            self.failed("request", exc)
        retry_s = self.config.probe_s * 2
        return StateUnavailable(
            f"the shared run state cannot be reached from this replica; retry in {retry_s:g} s or on another"
        )

    async def _call(self, what: Awaitable[Any]) -> Any:
        """A caller's request: tried even while the store is marked down (a refused connection fails at once, an
        unreachable host after `state.timeout_s`), so that the first call after Redis is back succeeds."""
        try:
            answer = await what
        except (RedisError, OSError) as exc:
            raise self._unavailable(exc) from exc
        self.reached()
        return answer

    async def _probe(self) -> None:
        renewed = 0.0
        while True:
            await asyncio.sleep(self.config.probe_s)
            due = time.monotonic() - renewed >= self.config.lease_s / 3
            if self.up and not due and not self._renew_now:
                continue
            self._renew_now = False
            try:
                await self._renew_leases()
            except (RedisError, OSError) as exc:
                self.failed("probe", exc)
                continue
            renewed = time.monotonic()
            self.reached()

    async def _renew_leases(self) -> None:
        by_caller: dict[str, list[str]] = {}
        for run in self._live.values():
            if not run.finished:
                by_caller.setdefault(run.caller, []).append(run.id)
        pipe = self.client.pipeline(transaction=False)
        pipe.ping()
        for caller, ids in by_caller.items():
            await self._renew(keys=[self.layout.caller_key(caller, "active")], args=[self.lease_ms, *ids], client=pipe)
        await pipe.execute()

    # runs driven here

    def on_cancel(self, callback: Callable[[str, bool], None]) -> None:
        self._on_cancel = callback

    def on_message(self, callback: Callable[[str, dict[str, Any]], dict[str, str]]) -> None:
        self._on_message = callback

    def _message(self, run_id: str, rest: str) -> None:
        """An interaction message (`deliver`) for a run of this process: applied, and the answer sent back."""
        reply_key, _, payload = rest.partition(" ")
        answer = self._on_message(run_id, json.loads(payload))
        pipe = self.client.pipeline(transaction=False)
        pipe.rpush(reply_key, json.dumps(answer))
        pipe.expire(reply_key, REPLY_TTL_S)
        self._spawn(self._call(pipe.execute()), f"reply {run_id}")

    async def admit(self, run: Run, *, key: str, fingerprint: str, limits: CallerConfig) -> Admission:
        caller = run.caller
        if not key and limits.max_concurrent_runs is None and limits.runs_per_minute is None and self.up:
            # nothing to check: the record goes with the run's first shipment (the module), no round trip first
            self._live[run.id] = run
            return Admission()
        fields = self.layout.fields_of(run, 0, ended=False)
        fields.update(owner=self.instance, created_ns=run.created_ns, fingerprint=fingerprint, key=key)
        flat = [part for pair in fields.items() for part in pair]
        answer = await self._call(
            self._admit(
                keys=[
                    self.layout.idem_key(caller, key),
                    self.layout.run_key(run.id),
                    self.layout.caller_key(caller, "active"),
                    self.layout.caller_key(caller, "starts"),
                ],
                args=[
                    run.id,
                    key,
                    self.layout.live_ttl_s * 1000,
                    -1 if limits.max_concurrent_runs is None else limits.max_concurrent_runs,
                    -1 if limits.runs_per_minute is None else limits.runs_per_minute,
                    self.lease_ms,
                    *flat,
                ],
            )
        )
        verdict = answer[0].decode()
        if verdict == "existing":
            return Admission(existing=answer[1].decode())
        if verdict == "busy":
            return Admission(
                refused=f"caller {caller} has {limits.max_concurrent_runs} runs in progress, its limit; "
                "wait for one to end"
            )
        if verdict == "rate":
            wait = -(-int(answer[1]) // 1000)  # rounded up: a retry on time is let in
            return Admission(
                refused=f"caller {caller} started {limits.runs_per_minute} runs in the last minute, its limit; "
                f"retry in {wait} s"
            )
        self._live[run.id] = run
        return Admission()

    def new_run(self, spec: RunSpec, control: RunControl, *, caller: str, key: str, fingerprint: str) -> Run:
        return SharedRun(spec, control, caller=caller, key=key, fingerprint=fingerprint, shipped=self.shipper.note)

    async def revive(self, spec: RunSpec, control: RunControl, *, caller: str) -> Run | str:
        pipe = self.client.pipeline(transaction=True)  # hash and stream as of one moment, and the run named ours
        pipe.hgetall(self.layout.run_key(spec.run_id))
        pipe.xrange(self.layout.events_key(spec.run_id))
        # from here a CancelRun reaches this process: it marks the record and tells the owner it names in one step
        # (redis_remote.CANCEL), so a mark not read here comes as a message (this process listens: it drives runs)
        await self._take(keys=[self.layout.run_key(spec.run_id)], args=[self.instance], client=pipe)  # queued
        fields, stream, _ = await self._call(pipe.execute())
        record = run_record(spec.run_id, fields) if fields else None
        if record is not None and record.finished:
            return record.state
        key = fields.get(b"key", b"").decode() if fields else ""
        run = SharedRun(
            spec,
            control,
            caller=caller,
            key=key,
            fingerprint=record.fingerprint if record else "",
            shipped=self.shipper.note,
        )
        if record is not None:
            run.created_ns = record.created_ns
        for _, entry_fields in stream:
            for entry in log_entries(entry_fields):
                if entry.seq != len(run.log) + 1:
                    break  # a stream is gapless by construction (explicit ids): anything else is not ours to extend
                run.log.append(entry)
        self.shipper.shipped[run.id] = run.stored = len(run.log)
        self._live[run.id] = run
        self._renew_now = True  # the dead owner's lease on the caller's concurrency becomes this process's
        # a CancelRun sent while nobody drove the run went to the dead owner's channel; its mark on the record is
        # what says so (an outside finding: the run went on here, calling tools, after the cancel was answered)
        stop_as_marked(control, fields.get(b"cancel_requested") if fields else None)
        return run

    async def mark_cancel(self, run_id: str, *, after_turn: bool) -> None:
        await self._call(self._mark(keys=[self.layout.run_key(run_id)], args=["after_turn" if after_turn else "now"]))

    async def flushed(self, within_s: float) -> bool:
        return await self.shipper.flushed(within_s)

    def settled(self, run: Run) -> None:
        self._live.pop(run.id, None)

    def forget(self, run: Run) -> None:
        """A run recorded here that another process will drive (the durable queue: whichever claims it): its lease
        is no longer renewed here, and nothing more of it is shipped from here."""
        self._live.pop(run.id, None)
        self.shipper.pending.pop(run.id, None)
        self.shipper.shipped.pop(run.id, None)
        self.shipper.recorded.pop(run.id, None)

    async def _listen(self) -> None:
        """Cancel requests for the runs of this process: on its channel, and (after every (re)subscription) in the
        runs' hashes, for a request published while it was not listening."""
        channel = self.layout.channel(self.instance)
        while True:
            pubsub = self.reader.pubsub()
            try:
                await pubsub.subscribe(channel)
                await self._requested_while_away()
                async for message in pubsub.listen():
                    if message["type"] == "message":
                        run_id, _, mode = message["data"].decode().partition(" ")
                        if mode.startswith("interact "):
                            self._message(run_id, mode.removeprefix("interact "))
                        else:
                            self._on_cancel(run_id, mode == "after_turn")
            except (RedisError, OSError) as exc:
                self.failed("control", exc)
                await asyncio.sleep(self.config.probe_s)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call,unused-ignore]  # typed from redis 8.2

    async def _requested_while_away(self) -> None:
        ids = [run.id for run in self._live.values() if not run.finished]
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for run_id in ids:
            pipe.hget(self.layout.run_key(run_id), "cancel_requested")
        for run_id, mode in zip(ids, await pipe.execute(), strict=True):
            if mode:
                self._on_cancel(run_id, mode == b"after_turn")

    # runs driven elsewhere (`redis_remote`)

    async def record(self, run_id: str) -> RunRecord | None:
        return await self.remote.record(run_id)

    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        return await self.remote.list_runs(query)

    async def mirror(self, record: RunRecord) -> Run:
        return await self.remote.mirror(record)

    def stop_watching(self, why: Callable[[str], AgentError]) -> None:
        self.remote.give_up_all(why)

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        return await self.remote.cancel(record, after_turn=after_turn, wait_s=wait_s)

    async def deliver(self, record: RunRecord, message: dict[str, Any], *, wait_s: float = 2.0) -> dict[str, str]:
        return await self.remote.deliver(record, message, wait_s=wait_s)
