"""Runs shared through Redis (`state.url: redis://…`): any replica answers GetRun, WatchRun and CancelRun for any
run, and idempotency keys and caller quotas hold for the fleet. Its keys, and how long they are kept:
`redis_layout.py`. A dead process's runs stop counting against their caller's concurrency when their leases
(`LEASE_S`, renewed by the owner every third of it) run out.

Watchers on this replica share one mirror per run (`MirrorRun`), filled by one task with blocking XREADs: the
history first (XREAD from 0-<n> returns at once what is there), then live entries as they are added. No polling.

Redis unreachable: runs in flight keep going and are shipped when it is back (`redis_ship.Shipper`); new runs, and
calls about runs this process does not drive, are refused with UNAVAILABLE (`StateUnavailable`); the store is marked
down (log line, `agent_state_store_up` 0, the health service `agent.v1.StateStore` NOT_SERVING) until a probe or a
write reaches it again, which it tries every `PROBE_S`.
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

from service import events as ev
from service import telemetry
from service.aio import cancel_and_wait
from service.config import CallerConfig, StateConfig
from service.control import RunControl
from service.errors import RunInterrupted, StateUnavailable
from service.loop import RunSpec
from service.run import Run, RunRecord
from service.state.base import Admission
from service.state.mirror import MirrorRun, SharedRun
from service.state.redis_client import ADMIT, RENEW, connect
from service.state.redis_layout import Layout, log_entries, run_record, stream_entries
from service.state.redis_ship import Shipper

log = logging.getLogger(__name__)

LEASE_S = 30.0  # a dead process's runs hold their caller's concurrency this long at most
PROBE_S = 1.0  # how often a process pings a store it lost (and renews leases, every LEASE_S / 3)
BLOCK_S = 5.0  # one blocking XREAD waits this long before it asks again
READ_COUNT = 1000
REPLY_TTL_S = 30  # an answer nobody took (its asker gave up) is gone after this


class RedisRunStore:
    def __init__(
        self, config: StateConfig, *, retention_s: float, max_run_s: float, on_health: Callable[[bool], Awaitable[None]]
    ) -> None:
        self.instance = secrets.token_hex(6)
        self.layout = Layout(
            config.prefix, self.instance, retention_s=retention_s, live_ttl_s=max(1, int(max_run_s + retention_s))
        )
        self.client = connect(config)
        self.reader = connect(config, read_timeout_s=BLOCK_S + config.timeout_s)  # blocking reads and pub/sub
        self.up = True
        self.shipper = Shipper(self.client, self.layout, failed=self.failed, reached=self.reached, settled=self.settled)
        self._on_health = on_health
        self._on_cancel: Callable[[str, bool], None] = lambda run_id, after_turn: None
        self._on_message: Callable[[str, dict[str, Any]], dict[str, str]] = lambda run_id, message: {
            "code": "UNAVAILABLE",
            "message": "this replica takes no messages for runs",
        }
        self._admit = self.client.register_script(ADMIT)
        self._renew = self.client.register_script(RENEW)
        self._renew_now = False
        self._live: dict[str, Run] = {}  # runs driven here, not yet settled in the store
        self._mirrors: dict[str, MirrorRun] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    # lifecycle

    async def start(self) -> None:
        try:
            await self.client.ping()
        except (RedisError, OSError) as exc:
            self.failed("connect", exc)  # serve anyway: the probe reconnects, runs are refused until then
        else:
            telemetry.STATE_UP.set(1)
        for name, job in (("shipper", self.shipper.run_forever), ("control", self._listen), ("probe", self._probe)):
            self._spawn(job(), f"state store {name}")

    async def close(self, flush_s: float = 5.0) -> None:
        """Ship what is left (up to `flush_s`), then stop the store's tasks and connections."""
        if not await self.shipper.flushed(flush_s):
            log.warning("closing with events not shipped", extra={"unshipped": self.shipper.unshipped()})
        await cancel_and_wait(list(self._tasks), 5.0)
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
            self.shipper.note_all(self._live.values())
            self._renew_now = True  # a Redis restarted empty has lost the leases: at the probe's next round

    def _unavailable(self, exc: BaseException | None = None) -> StateUnavailable:
        if exc is not None:
            self.failed("request", exc)
        return StateUnavailable(
            f"the shared run state cannot be reached from this replica; retry in {PROBE_S * 2:g} s or on another"
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
            await asyncio.sleep(PROBE_S)
            due = time.monotonic() - renewed >= LEASE_S / 3
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
            await self._renew(
                keys=[self.layout.caller_key(caller, "active")], args=[int(LEASE_S * 1000), *ids], client=pipe
            )
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
                    int(LEASE_S * 1000),
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

    def settled(self, run: Run) -> None:
        self._live.pop(run.id, None)

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
                await asyncio.sleep(PROBE_S)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]

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

    # runs driven elsewhere

    async def record(self, run_id: str) -> RunRecord | None:
        fields = await self._call(self.client.hgetall(self.layout.run_key(run_id)))
        return None if not fields else run_record(run_id, fields)

    async def mirror(self, record: RunRecord) -> Run:
        mirror = self._mirrors.get(record.run_id)
        if mirror is None:
            mirror = self._mirrors[record.run_id] = MirrorRun(record)
            task = self._spawn(self._feed(mirror), f"mirror {record.run_id}")
            task.add_done_callback(lambda _: self._mirrors.pop(record.run_id, None))
        return mirror

    async def _feed(self, mirror: MirrorRun) -> None:
        """Fill `mirror` from its stream until its last event: blocking reads, history first."""
        key = self.layout.events_key(mirror.id)
        while not mirror.finished and mirror.lost is None:
            try:
                read = await self.reader.xread(
                    {key: f"0-{len(mirror.log)}"}, count=READ_COUNT, block=int(BLOCK_S * 1000)
                )
            except (RedisError, OSError) as exc:
                self.failed("watch", exc)
                await asyncio.sleep(PROBE_S)
                continue
            entries = [entry for _, fields in stream_entries(read) for entry in log_entries(fields)]
            if entries:
                mirror.extend(entries)
                continue
            try:
                alive = await self._driven(mirror)
            except (RedisError, OSError) as exc:
                self.failed("watch", exc)
                continue
            if not alive:
                mirror.give_up(
                    RunInterrupted(
                        f"run {mirror.id} stopped at seq {len(mirror.log)}: the replica that drove it stopped "
                        "renewing its lease (it died or lost Redis for longer than the lease)"
                    )
                )

    async def _driven(self, mirror: MirrorRun) -> bool:
        """Whether a process still holds the run's lease (checked when its stream is quiet for a blocking read)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.zscore(self.layout.caller_key(mirror.caller, "active"), mirror.id)
        pipe.time()
        pipe.hget(self.layout.run_key(mirror.id), "state")
        expiry, (seconds, micros), state = await pipe.execute()
        if state in (b"succeeded", b"failed", b"cancelled"):
            return True  # its last events are on their way
        return expiry is not None and float(expiry) > seconds * 1000 + micros // 1000

    async def cancel(self, record: RunRecord, *, after_turn: bool, wait_s: float) -> RunRecord:
        mode = "after_turn" if after_turn else "now"
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.layout.run_key(record.run_id), "cancel_requested", mode)
        pipe.publish(self.layout.channel(record.owner), f"{record.run_id} {mode}")
        await self._call(pipe.execute())
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
        last = f"0-{record.last_seq}"
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            answer = await self._call(
                self.reader.xread(
                    {self.layout.events_key(record.run_id): last}, count=READ_COUNT, block=max(1, int(left * 1000))
                )
            )
            if not answer:
                return
            entries = answer[0][1]
            last = entries[-1][0]
            if isinstance(log_entries(entries[-1][1])[-1].event, ev.FinalResponse | ev.RunFailed):
                return
