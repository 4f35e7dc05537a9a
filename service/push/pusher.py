"""Completion push: when a background run with a callback ends, its notification is POSTed to the callback URL,
signed, and tried again with backoff until a 2xx comes back or it expires (docs/push.md). At least once: every try
carries the same `Agent-Delivery` id, for the receiver to drop a repeat.

The schedule is kept in the delivery store, not in a retrying coroutine: a delivery waits hours between late tries,
and must survive a restart and move to another replica. So tenacity gives the waits (exponential, jittered) and the
store keeps where each delivery stands; every replica's sender claims the due ones (`store.py`).

Signature: `Agent-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>." + body)>`, t being the time of
the try (a receiver refuses old ones: replay protection), the body the same bytes on every try.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import httpx
from tenacity import RetryCallState, wait_exponential_jitter

from service import events as ev
from service import telemetry
from service.aio import cancel_and_wait
from service.config import PushConfig
from service.errors import InvalidRequest, NotFound, RecordsUnavailable
from service.push.guard import Refused, UrlGuard
from service.push.store import Delivery, DeliveryStore
from tools._pinned import connect_only_to, pinned_client

if TYPE_CHECKING:
    from service.run import Run, RunRecord

log = logging.getLogger(__name__)

Lookup = Callable[[str, str], Awaitable["RunRecord"]]  # (run id, caller) -> the run's record, NotFound if none
SIGNATURE_HEADER = "Agent-Signature"
DELIVERY_HEADER = "Agent-Delivery"
_SENDS = 16  # tries in flight per process
_RECONCILE_EVERY = 12  # polls between looks at deliveries still waiting for a run that may have ended unnoticed


def delivery_id(run_id: str) -> str:
    """One per run, the same on every try and every replica."""
    return "dlv_" + run_id.removeprefix("run_")


def sign(secret: str, timestamp: int, body: bytes) -> str:
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def _time(ns: int) -> str | None:
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat().replace("+00:00", "Z") if ns else None


def notification(record: RunRecord) -> str:
    """The body: what the run came to, as JSON (the same bytes on every try)."""
    outcome = record.outcome
    final = error = None
    if isinstance(outcome, ev.FinalResponse):
        final = {
            "text": outcome.text,
            "stop_reason": outcome.stop_reason,
            "turns": outcome.turns,
            "tool_calls": outcome.tool_calls,
            "input_tokens": outcome.input_tokens,
            "output_tokens": outcome.output_tokens,
        }
    elif isinstance(outcome, ev.RunFailed):
        error = {"code": outcome.code, "message": outcome.message, "retryable": outcome.retryable}
    body = {
        "type": "run.ended",
        "delivery_id": delivery_id(record.run_id),
        "run_id": record.run_id,
        "state": record.state.upper(),
        "last_seq": record.last_seq,
        "final_response": final,
        "error": error,
        "created": _time(record.created_ns),
        "ended": _time(record.ended_ns),
        "timestamp": record.ended_ns // 10**9,
    }
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False)


class Pusher:
    def __init__(
        self,
        store: DeliveryStore,
        guard: UrlGuard,
        config: PushConfig,
        *,
        lookup: Lookup,
        max_wait_for_run_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`lookup`: a run's record, for deliveries whose run ended unnoticed; `max_wait_for_run_s`: after this a
        delivery still waiting for its run expires (the run's longest life and its retention)."""
        self.store = store
        self.guard = guard
        self.config = config
        self.lookup = lookup
        self.max_wait_for_run_ns = int(max_wait_for_run_s * 1e9)
        self.clock = clock
        self.wait = wait_exponential_jitter(
            multiplier=config.initial_backoff_s, max=config.max_backoff_s, jitter=config.initial_backoff_s
        )
        self.client = pinned_client(config.timeout_s)
        self._wake = asyncio.Event()
        self._sends = asyncio.Semaphore(_SENDS)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._reconciled_ns = 0  # the waiting deliveries are looked at in registration order, from here

    # SubmitRun

    async def register(self, run_id: str, caller: str, url: str, secret: str) -> None:
        """Take a run's callback (before the run starts, so that its end cannot come first). INVALID_ARGUMENT when
        the URL or secret is refused."""
        if len(secret.encode()) > self.config.max_secret_bytes:
            raise InvalidRequest(f"callback.secret is longer than {self.config.max_secret_bytes} bytes")
        try:
            await self.guard.addresses(self.guard.parse(url))
        except Refused as exc:
            raise InvalidRequest(f"callback.url refused: {exc}") from None
        delivery = Delivery(
            delivery_id=delivery_id(run_id),
            run_id=run_id,
            caller=caller,
            url=url,
            secret=secret,
            created_ns=self._now_ns(),
        )
        await self.store.register(delivery)

    async def forget(self, run_id: str) -> None:
        await self.store.forget(run_id)

    # the registry's end of a run

    def ended(self, run: Run, background: bool) -> None:
        """A run driven here ended: its delivery (if it has one: only background runs may) is due now."""
        if background:
            self._spawn(self._ended(run.record()), f"push ended {run.id}")

    async def _ended(self, record: RunRecord) -> None:
        try:
            due = await self.store.ended(record.run_id, notification(record), record.ended_ns, self._now_ns())
        except Exception:  # the reconciling look finds it later (`_reconcile`)
            log.exception("callback not scheduled", extra={"run_id": record.run_id})
            return
        if due:
            self._wake.set()

    # sending

    async def start(self) -> None:
        self._loop_task = asyncio.create_task(self._run_forever(), name="push sender")

    async def aclose(self) -> None:
        tasks = [*self._tasks, *([self._loop_task] if self._loop_task is not None else [])]
        await cancel_and_wait(tasks, 5.0)
        await self.client.aclose()
        await self.store.aclose()

    async def _run_forever(self) -> None:
        rounds = 0
        while True:
            self._wake.clear()
            try:
                if rounds % _RECONCILE_EVERY == 0:
                    await self._reconcile()
                await self._send_due()
            except RecordsUnavailable:
                pass  # the next round tries again
            except Exception:
                log.exception("push round failed")
            rounds += 1
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.config.poll_s):
                    await self._wake.wait()

    async def _send_due(self) -> None:
        free = _SENDS - len([t for t in self._tasks if t.get_name().startswith("push send")])
        if free <= 0:
            return
        now = self._now_ns()
        lease = now + int((self.config.timeout_s + 30) * 1e9)  # outlives the try, so no other sender starts it
        for delivery in await self.store.claim(now, lease, free):
            self._spawn(self._send_logged(delivery), f"push send {delivery.delivery_id}")

    async def _send_logged(self, delivery: Delivery) -> None:
        try:
            await self._send(delivery)
        except Exception:  # the store failed us: the lease runs out, and the delivery is claimed again then
            log.exception("callback try not recorded", extra={"run_id": delivery.run_id})

    async def _send(self, delivery: Delivery) -> None:
        async with self._sends:
            now = self._now_ns()
            if now > delivery.ended_ns + int(self.config.expire_s * 1e9):
                await self.store.settle(delivery.delivery_id, "expired", delivery.last_error)
                telemetry.child(telemetry.PUSH_DELIVERIES, "expired").inc()
                log.warning("callback expired", extra={"run_id": delivery.run_id, "attempts": delivery.attempts - 1})
                return
            try:
                outcome, error = await self._try(delivery)
            except asyncio.CancelledError:
                # stopped mid-try (shutdown): due again at once for the next sender, rather than after the lease
                await asyncio.shield(self.store.retry(delivery.delivery_id, now, "interrupted"))
                raise
            telemetry.child(telemetry.PUSH_DELIVERIES, outcome).inc()
            if outcome == "delivered":
                await self.store.settle(delivery.delivery_id, "delivered")
                return
            delay = self._backoff(delivery.attempts)
            await self.store.retry(delivery.delivery_id, now + int(delay * 1e9), error)
            # this process's own retry is woken on time; another replica's poll finds it too (a harmless late wake
            # after close: the event has no waiter)
            asyncio.get_running_loop().call_later(delay, self._wake.set)
            log.info(
                "callback not delivered; tried again later",
                extra={"run_id": delivery.run_id, "attempt": delivery.attempts, "error": error, "retry_in_s": delay},
            )

    async def _try(self, delivery: Delivery) -> tuple[str, str]:
        """One POST: its outcome (delivered, failed, refused) and, unless delivered, why."""
        body = (delivery.body or "").encode()
        headers = {"content-type": "application/json", DELIVERY_HEADER: delivery.delivery_id}
        if delivery.secret:
            headers[SIGNATURE_HEADER] = sign(delivery.secret, int(self.clock()), body)
        try:
            url = self.guard.parse(delivery.url)
            addresses = await self.guard.addresses(url)  # again: the host may resolve elsewhere now (DNS rebinding)
        except Refused as exc:
            return "refused", str(exc)
        try:
            with connect_only_to(url, addresses):
                async with self.client.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
        except httpx.HTTPError as exc:
            return "failed", f"{type(exc).__name__}: {exc}"
        if 200 <= status < 300:
            return "delivered", ""
        return "failed", f"the receiver answered {status}"

    def _backoff(self, attempts: int) -> float:
        state = RetryCallState(retry_object=None, fn=None, args=(), kwargs={})  # type: ignore[arg-type]
        state.attempt_number = attempts
        return float(self.wait(state))

    async def _reconcile(self) -> None:
        """Deliveries whose run ended without `ended` reaching the store (its process died in between, or the run
        ended on a replica that had not started): scheduled from the run's record; the hopeless ones expire."""
        now = self._now_ns()
        recent = now - int(2 * self.config.poll_s * 1e9)  # a run just submitted is not looked up yet
        batch = await self.store.waiting(self._reconciled_ns, recent, 100)
        self._reconciled_ns = batch[-1].created_ns if len(batch) == 100 else 0  # wrap around when done
        for delivery in batch:
            try:
                record = await self.lookup(delivery.run_id, delivery.caller)
            except NotFound:
                if now - delivery.created_ns > self.max_wait_for_run_ns:
                    await self.store.settle(delivery.delivery_id, "expired", "the run was not found")
                    telemetry.child(telemetry.PUSH_DELIVERIES, "expired").inc()
                continue
            if record.finished:
                await self._ended(record)

    def _spawn(self, job: Awaitable[Any], name: str) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(job)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _now_ns(self) -> int:
        return int(self.clock() * 1e9)
