"""The shipper against the real Redis: a round of many runs lands each run's events gapless with its record, TTLs,
lease and index entry; a round re-sent (its reply lost) adds nothing twice; one run's refused write does not stop
the others'; a Redis restarted empty (its scripts gone too) gets every event back; and a large round yields to the
loop while it is prepared and spaces the next by what it cost."""

from __future__ import annotations

import asyncio
import itertools
import logging
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from backends import RedisNamespace
from test_state_outage import OwnRedis, eventually, own_redis  # noqa: F401  (a fixture)

from service import events as ev
from service.config import StateConfig
from service.control import RunControl
from service.loop import RunSpec
from service.run import Run
from service.state.redis_client import connect
from service.state.redis_layout import Layout, log_entries, run_record
from service.state.redis_ship import MAX_REST_S, REST_PER_HELD, SLICE, Shipper

RETENTION_S = 60.0
LIVE_TTL_S = 600
LEASE_MS = 30_000


def new_run(caller: str = "alice", key: str = "") -> Run:
    spec = RunSpec(
        run_id=f"run_{secrets.token_hex(6)}", message="m", model="m", system=None, max_turns=1, max_tokens=1, tools=()
    )
    return Run(spec, RunControl(), caller=caller, key=key, fingerprint="fp")


def grow(run: Run, deltas: int, *, end: bool = False) -> None:
    if not run.log:
        run.append(ev.RunStarted(model="m", tools=(), max_turns=1))
    for i in range(deltas):
        run.append(ev.TextDelta(turn=1, text=f"{run.id} {len(run.log)} {i}"))
    if end:
        run.append(
            ev.FinalResponse(
                text="done",
                stop_reason="end_turn",
                turns=1,
                tool_calls=0,
                input_tokens=1,
                output_tokens=1,
                duration_s=0.5,
            )
        )
        run.finish()


class Shipping:
    """A shipper on its own task, with what it reports."""

    def __init__(self, url: str, prefix: str) -> None:
        self.client = connect(StateConfig(url=url, prefix=prefix, timeout_s=2))
        self.layout = Layout(prefix, "me", retention_s=RETENTION_S, live_ttl_s=LIVE_TTL_S)
        self.settled: list[str] = []
        self.failures: list[BaseException] = []
        self.shipper = Shipper(
            self.client,
            self.layout,
            failed=lambda what, exc: self.failures.append(exc),
            reached=lambda: None,
            settled=lambda run: self.settled.append(run.id),
            linger_s=0.001,
            lease_ms=LEASE_MS,
        )
        self.task = asyncio.ensure_future(self.shipper.run_forever())

    async def ship(self, runs: list[Run]) -> None:
        self.shipper.note_all(runs)
        assert await self.shipper.flushed(20)

    async def close(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task
        await self.shipper.close()
        await self.client.aclose()

    async def stored(self, run: Run) -> list[tuple[int, ev.Event]]:
        stream = await self.client.xrange(self.layout.events_key(run.id))
        return [(entry.seq, entry.event) for _, fields in stream for entry in log_entries(fields)]

    async def check(self, run: Run) -> None:
        """The run's stream holds exactly its log, 1..n, and its record says its state and last seq."""
        assert await self.stored(run) == [(entry.seq, entry.event) for entry in run.log]
        record = run_record(run.id, await self.client.hgetall(self.layout.run_key(run.id)))
        assert (record.caller, record.owner, record.fingerprint) == (run.caller, "me", "fp")
        assert record.created_ns == run.created_ns
        if run.finished:
            assert (record.state, record.last_seq, record.outcome) == (run.state.value, len(run.log), run.outcome)


@pytest.fixture
async def shipping(redis_ns: RedisNamespace) -> AsyncIterator[Shipping]:
    shipping = Shipping(redis_ns.url, redis_ns.prefix)
    yield shipping
    await shipping.close()


async def test_a_round_of_many_runs_lands_each_gapless_with_its_record_ttls_lease_and_index(
    shipping: Shipping,
) -> None:
    runs = [new_run(caller=f"c{i % 3}", key="k" if i % 5 == 0 else "") for i in range(300)]
    for i, run in enumerate(runs):
        grow(run, i % 7, end=i % 2 == 0)  # half end in their first shipment
    await shipping.ship(runs)
    for run in runs[1::2]:
        grow(run, 3, end=True)
    await shipping.ship(runs[1::2])

    client, layout = shipping.client, shipping.layout
    assert sorted(shipping.settled) == sorted(run.id for run in runs)
    for run in runs:
        await shipping.check(run)
        for key in (layout.run_key(run.id), layout.events_key(run.id)):
            assert 0 < await client.pttl(key) <= RETENTION_S * 1000  # the retention, not the live TTL
        assert await client.zscore(layout.caller_key(run.caller, "runs"), run.id) == run.created_ns // 1000
    for caller in ("c0", "c1", "c2"):
        assert await client.zcard(layout.caller_key(caller, "active")) == 0  # every lease given back
        assert await client.zcard(layout.caller_key(caller, "runs")) == 100
    assert shipping.failures == []


async def test_a_running_run_holds_a_lease_and_the_live_ttl_until_it_ends(shipping: Shipping) -> None:
    run = new_run()
    grow(run, 2)
    await shipping.ship([run])
    client, layout = shipping.client, shipping.layout
    assert LIVE_TTL_S * 1000 - 60_000 < await client.pttl(layout.run_key(run.id)) <= LIVE_TTL_S * 1000
    (seconds, micros) = await client.time()
    expiry = await client.zscore(layout.caller_key("alice", "active"), run.id)
    assert expiry is not None and 0 < expiry - (seconds * 1000 + micros // 1000) <= LEASE_MS
    record = run_record(run.id, await client.hgetall(layout.run_key(run.id)))
    assert record.state == "running" or record.state == "queued"

    grow(run, 1, end=True)
    await shipping.ship([run])
    await shipping.check(run)
    assert await client.zscore(layout.caller_key("alice", "active"), run.id) is None
    assert await client.pttl(layout.run_key(run.id)) <= RETENTION_S * 1000


async def test_a_round_sent_again_after_a_lost_reply_adds_nothing_twice(
    shipping: Shipping, caplog: pytest.LogCaptureFixture
) -> None:
    runs = [new_run() for _ in range(20)]
    for run in runs:
        grow(run, 3)
    await shipping.ship(runs)
    forgotten = {run.id: run for run in runs}
    for run in runs:  # as after a lost reply: the shipper does not know the round landed, and sends it again
        shipping.shipper.shipped.pop(run.id)
        shipping.shipper.recorded.pop(run.id)
    with caplog.at_level(logging.WARNING, logger="service.state.redis_ship"):
        await shipping.ship(list(forgotten.values()))
        for run in runs:  # refused as already there ("equal or smaller"), which is no failure
            assert await shipping.stored(run) == [(entry.seq, entry.event) for entry in run.log]

        for run in runs:  # after a failure the shipper asks each stream where it ends before it ships again
            shipping.shipper.shipped.pop(run.id)
            grow(run, 2, end=True)
        shipping.shipper.resync()
        await shipping.ship(runs)
    assert [r for r in caplog.records if r.name == "service.state.redis_ship"] == []
    for run in runs:
        await shipping.check(run)


async def test_one_runs_refused_write_is_logged_and_the_others_land(
    shipping: Shipping, caplog: pytest.LogCaptureFixture
) -> None:
    broken, *others = [new_run() for _ in range(5)]
    await shipping.client.set(shipping.layout.run_key(broken.id), "not a hash")
    for run in [broken, *others]:
        grow(run, 2, end=True)
    with caplog.at_level(logging.WARNING, logger="service.state.redis_ship"):
        await shipping.ship([broken, *others])
    refused = [r.getMessage() for r in caplog.records if r.name == "service.state.redis_ship"]
    assert len(refused) == 1 and "WRONGTYPE" in refused[0]
    for run in others:
        await shipping.check(run)
    assert len(await shipping.stored(broken)) == len(broken.log)  # its events landed; its record could not


async def test_a_redis_restarted_empty_gets_every_event_back(tmp_path: Path, own_redis: OwnRedis) -> None:  # noqa: F811
    shipping = Shipping(own_redis.url, "restart:")
    try:
        runs = [new_run() for _ in range(10)]
        for run in runs:
            grow(run, 2)
        await shipping.ship(runs)
        await own_redis.kill()
        for run in runs:
            grow(run, 2, end=True)
        shipping.shipper.note_all(runs)
        await eventually(lambda: len(shipping.failures) > 0)
        await own_redis.start()  # empty, and without the script: EVALSHA answers NOSCRIPT until it is loaded again
        assert await shipping.shipper.flushed(20)
        for run in runs:
            await shipping.check(run)
    finally:
        await shipping.close()


async def test_a_large_round_lets_a_start_behind_it_go_before_its_call(shipping: Shipping) -> None:
    """A round of hundreds of runs is prepared in slices: what waits on the loop runs before the round's call."""
    shipper = shipping.shipper
    order: list[str] = []
    script = shipper._script

    async def call(**kwargs: Any) -> Any:
        order.append("call")
        return await script(**kwargs)

    shipper._script = call  # type: ignore[assignment]
    runs = [new_run() for _ in range(3 * SLICE)]
    for run in runs:
        grow(run, 1)
    asyncio.get_running_loop().call_soon(order.append, "start")  # queued behind the round
    assert await shipper._ship({run.id: run for run in runs}) == []
    assert order == ["start", "call"]
    for run in runs:
        await shipping.check(run)


async def test_a_round_that_held_the_loop_long_is_followed_by_a_longer_wait(shipping: Shipping) -> None:
    """The wait before a round is linger_s, or REST_PER_HELD times the loop time of the round before, up to
    MAX_REST_S. Clock readings 5 ms apart: a round of one run holds the loop in two stretches, 10 ms."""
    ticks = itertools.count()
    waits: list[float] = []

    async def pause(seconds: float) -> None:
        waits.append(seconds)
        await asyncio.sleep(0)

    shipper = Shipper(
        shipping.client,
        shipping.layout,
        failed=lambda what, exc: None,
        reached=lambda: None,
        settled=lambda run: None,
        linger_s=0.001,
        lease_ms=LEASE_MS,
        clock=lambda: next(ticks) * 0.005,
        pause=pause,
    )
    task = asyncio.ensure_future(shipper.run_forever())
    try:
        run = new_run()
        for deltas in (1, 1):
            grow(run, deltas)
            shipper.note(run)
            assert await shipper.flushed(20)
        assert shipper.held_s == pytest.approx(0.010)
        assert waits == [0.001, pytest.approx(REST_PER_HELD * 0.010)]
        many = [new_run() for _ in range(3 * SLICE)]
        for other in many:
            grow(other, 1)
        shipper.note_all(many)
        assert await shipper.flushed(20)
        grow(run, 1, end=True)
        shipper.note(run)
        assert await shipper.flushed(20)
        assert waits[-1] == MAX_REST_S  # the large round held the loop 25 ms: capped
        for each in [run, *many]:
            await shipping.check(each)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await shipper.close()
