"""Completion push: a background run's end POSTed, signed, to a real local receiver; retried with one delivery id;
refused by the SSRF guard; kept across a restart; claimed by one replica at a time on PostgreSQL."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from aiohttp import web
from backends import PostgresSchema, audit_key_file
from prometheus_client import REGISTRY

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.config import PushConfig
from service.push.guard import UrlGuard
from service.push.pusher import Pusher, delivery_id
from service.push.store import Delivery, SqliteDeliveryStore
from service.records.postgres import PgRecords

LOOPBACK_OK = {"allow_private": ["127.0.0.0/8"], "initial_backoff_s": 0.01, "max_backoff_s": 0.05, "poll_s": 0.2}
SECRET = "whsec_test"


def verify(secret: str, header: str, body: bytes, tolerance_s: float = 300) -> bool:
    """What docs/push.md shows a receiver: the signature over `t.body`, and a recent `t`."""
    fields = dict(part.split("=", 1) for part in header.split(","))
    expected = hmac.new(secret.encode(), fields["t"].encode() + b"." + body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, fields["v1"]) and abs(time.time() - int(fields["t"])) <= tolerance_s


class Receiver:
    """A real HTTP server on 127.0.0.1:0 that answers the statuses in `answers` in turn (then 200) and keeps each
    request it got."""

    def __init__(self) -> None:
        self.answers: list[int] = []
        self.got: list[tuple[dict[str, str], bytes]] = []
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/hook", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hook"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        async with self._arrived:
            self.got.append((dict(request.headers), body))
            self._arrived.notify_all()
        return web.Response(status=self.answers.pop(0) if self.answers else 200)

    async def wait_for(self, n: int) -> None:
        async with asyncio.timeout(10.0), self._arrived:
            await self._arrived.wait_for(lambda: len(self.got) >= n)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    server = Receiver()
    await server.start()
    yield server
    await server.stop()


def pushed(outcome: str) -> float:
    return REGISTRY.get_sample_value("agent_push_deliveries_total", {"outcome": outcome}) or 0.0


async def settled(svc: Any, run_id: str, state: str = "delivered") -> Delivery:
    for _ in range(500):
        found = await svc.push.store.get(delivery_id(run_id))
        if found is not None and found.state == state:
            return found
        await asyncio.sleep(0.01)
    raise AssertionError(f"the delivery of {run_id} is {found}")


async def submit(svc: Any, channel_to: Any, url: str, secret: str = SECRET) -> str:
    request = pb.RunAgentRequest(message="hi", callback=pb.Callback(url=url, secret=secret))
    return (await stub(channel_to(svc)).SubmitRun(request)).run_id


async def test_the_notification_is_signed_and_the_signature_verifies(
    start_service: Any, channel_to: Any, receiver: Receiver
) -> None:
    svc = await start_service(push=LOOPBACK_OK)
    before = pushed("delivered")
    run_id = await submit(svc, channel_to, receiver.url)
    await receiver.wait_for(1)
    headers, body = receiver.got[0]
    assert verify(SECRET, headers["Agent-Signature"], body)
    assert not verify("another secret", headers["Agent-Signature"], body)
    assert not verify(SECRET, headers["Agent-Signature"], body.replace(b"SUCCEEDED", b"FAILED"))
    note = json.loads(body)
    assert headers["Agent-Delivery"] == note["delivery_id"] == delivery_id(run_id)
    assert (note["run_id"], note["state"], note["error"]) == (run_id, "SUCCEEDED", None)
    run = await stub(channel_to(svc)).GetRun(pb.GetRunRequest(run_id=run_id))
    assert note["final_response"]["text"] == run.final_response.text and note["last_seq"] == run.last_seq
    assert (await settled(svc, run_id)).attempts == 1
    assert pushed("delivered") == before + 1


async def test_a_receiver_that_fails_twice_gets_three_tries_with_one_delivery_id(
    start_service: Any, channel_to: Any, receiver: Receiver
) -> None:
    receiver.answers = [500, 503]
    svc = await start_service(push=LOOPBACK_OK)
    failed = pushed("failed")
    run_id = await submit(svc, channel_to, receiver.url)
    await receiver.wait_for(3)
    delivery = await settled(svc, run_id)
    assert [h["Agent-Delivery"] for h, _ in receiver.got] == [delivery_id(run_id)] * 3
    assert len({body for _, body in receiver.got}) == 1  # the same bytes every time; only the signature's t moves
    assert all(verify(SECRET, h["Agent-Signature"], b) for h, b in receiver.got)
    assert delivery.attempts == 3 and pushed("failed") == failed + 2
    await asyncio.sleep(0.2)  # nothing more once acknowledged
    assert len(receiver.got) == 3


async def test_the_ssrf_guard_refuses_loopback_and_callbacks_off_submit_run(
    start_service: Any, channel_to: Any, receiver: Receiver
) -> None:
    svc = await start_service()  # the default: callbacks go to public addresses only
    api = stub(channel_to(svc))
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await api.SubmitRun(pb.RunAgentRequest(message="hi", callback=pb.Callback(url=receiver.url)))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "callback.url refused: 127.0.0.1 resolves to 127.0.0.1, a loopback address" in refused.value.details()
    for url in ("ftp://example.com/x", "http://user:pw@example.com/x", "not a url"):
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await api.SubmitRun(pb.RunAgentRequest(message="hi", callback=pb.Callback(url=url)))
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, url
    with pytest.raises(grpc.aio.AioRpcError) as streaming:
        await api.RunAgent(pb.RunAgentRequest(message="hi", callback=pb.Callback(url=receiver.url))).read()
    assert streaming.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "SubmitRun only" in streaming.value.details()
    assert not receiver.got and len(svc.registry.runs) == 0  # nothing started


async def test_a_host_that_resolves_inward_at_send_time_is_not_called(tmp_path: Path, receiver: Receiver) -> None:
    """DNS rebinding: public when SubmitRun checked it, loopback when the notification goes."""
    answers = {"hooks.example": ["93.184.215.14"]}

    async def dns(host: str, port: int) -> list[str]:
        return answers[host]

    config = PushConfig.model_validate({"initial_backoff_s": 60})
    store = SqliteDeliveryStore(tmp_path / "push.db")
    pusher = Pusher(store, UrlGuard(config, dns), config, lookup=_no_lookup, max_wait_for_run_s=60)
    port = receiver.url.split(":")[2].split("/")[0]
    await pusher.register("run_1", "anonymous", f"http://hooks.example:{port}/hook", "")
    answers["hooks.example"] = ["127.0.0.1"]
    assert await store.ended("run_1", "{}", time.time_ns(), time.time_ns())
    refused = pushed("refused")
    await pusher._send_due()
    for _ in range(200):
        delivery = await store.get(delivery_id("run_1"))
        if delivery is not None and delivery.last_error:
            break
        await asyncio.sleep(0.01)
    assert delivery is not None and "resolves to 127.0.0.1, a loopback address" in delivery.last_error
    assert delivery.state == "pending" and delivery.next_ns > time.time_ns() + 50e9  # tried again later
    assert not receiver.got and pushed("refused") == refused + 1
    await pusher.aclose()


async def _no_lookup(run_id: str, caller: str) -> Any:
    raise AssertionError("not looked up")


async def test_a_pending_delivery_survives_a_restart(start_service: Any, channel_to: Any, receiver: Receiver) -> None:
    await restart_with_a_delivery_pending(start_service, channel_to, receiver)  # data_dir's push.db


async def test_a_pending_delivery_survives_a_restart_on_postgres(
    postgres_schema: PostgresSchema, start_service: Any, channel_to: Any, receiver: Receiver, tmp_path: Path
) -> None:
    # another data_dir after the restart: what resumes is in PostgreSQL, not on this node's disk
    await restart_with_a_delivery_pending(
        start_service,
        channel_to,
        receiver,
        records={"url": postgres_schema.url},
        audit={"key_file": audit_key_file(tmp_path)},
        data_dir=tmp_path / "elsewhere",
    )


async def restart_with_a_delivery_pending(
    start_service: Any, channel_to: Any, receiver: Receiver, **after: Any
) -> None:
    receiver.answers = [500] * 1000
    push = {**LOOPBACK_OK, "initial_backoff_s": 0.3, "max_backoff_s": 0.3}
    records = {k: after[k] for k in ("records", "audit") if k in after}
    first = await start_service(push=push, **records)
    run_id = await submit(first, channel_to, receiver.url)
    await receiver.wait_for(1)
    await first.server.stop(0)
    await first.close()
    tries = len(receiver.got)
    receiver.answers = []
    second = await start_service(push=push, **after)
    delivery = await settled(second, run_id)
    assert len(receiver.got) == tries + 1 and delivery.attempts == tries + 1
    assert {h["Agent-Delivery"] for h, _ in receiver.got} == {delivery_id(run_id)}


async def test_replicas_claim_each_delivery_once_on_postgres(postgres_schema: PostgresSchema, tmp_path: Path) -> None:
    from service.push.pg_store import PgDeliveryStore

    databases = [PgRecords(postgres_schema.url, spool_path=tmp_path / f"spool{i}.db") for i in range(2)]
    for db in databases:
        await db.open()
    stores = [PgDeliveryStore(db) for db in databases]
    now = time.time_ns()
    for i in range(40):
        run = f"run_{i:02d}"
        await stores[0].register(Delivery(delivery_id=delivery_id(run), run_id=run, caller="c", url="u", secret=""))
        await stores[1].ended(run, "{}", now, now)
    lease = now + 60 * 10**9
    claims = await asyncio.gather(*(stores[i % 2].claim(now, lease, 7) for i in range(8)))
    claimed = [d.delivery_id for batch in claims for d in batch]
    assert len(claimed) == len(set(claimed)) == 40  # every due delivery once, none twice
    assert not await stores[0].claim(now, lease, 10)  # leased: nobody else takes them
    await stores[1].retry(claimed[0], now, "failed")
    assert [d.delivery_id for d in await stores[0].claim(now + 1, lease, 10)] == [claimed[0]]
    for db in databases:
        await db.release()


async def test_a_run_that_ended_unnoticed_is_found_and_a_lost_one_expires(tmp_path: Path) -> None:
    """The process that ended a run died before scheduling its delivery: the periodic look schedules it from the run's
    record; a delivery whose run is gone for good expires."""
    from service import events as ev
    from service.errors import NotFound
    from service.run import RunRecord

    async def dns(host: str, port: int) -> list[str]:
        return ["93.184.215.14"]

    final = ev.FinalResponse(
        text="done", stop_reason="end_turn", turns=1, tool_calls=0, input_tokens=1, output_tokens=1, duration_s=0.1
    )

    async def lookup(run_id: str, caller: str) -> RunRecord:
        if run_id == "run_gone":
            raise NotFound(run_id)
        return RunRecord(run_id, caller, "succeeded", 5, 1, 2, final)

    now = [time.time()]
    config = PushConfig()
    store = SqliteDeliveryStore(tmp_path / "push.db")
    pusher = Pusher(store, UrlGuard(config, dns), config, lookup=lookup, max_wait_for_run_s=3600, clock=lambda: now[0])
    for run_id in ("run_ended", "run_gone"):
        await pusher.register(run_id, "anonymous", "https://hooks.example/x", "s")
    await pusher._reconcile()  # just registered: not looked at yet
    assert (await store.get(delivery_id("run_ended"))).state == "waiting"  # type: ignore[union-attr]
    now[0] += 60
    await pusher._reconcile()
    ended = await store.get(delivery_id("run_ended"))
    assert ended is not None and ended.state == "pending" and json.loads(ended.body or "")["state"] == "SUCCEEDED"
    assert (await store.get(delivery_id("run_gone"))).state == "waiting"  # type: ignore[union-attr]
    now[0] += 3600
    await pusher._reconcile()
    assert (await store.get(delivery_id("run_gone"))).state == "expired"  # type: ignore[union-attr]
    await pusher.aclose()
