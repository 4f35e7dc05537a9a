"""First events first (service/rpc/firsts.py): while a new RunAgent call has not sent its first event, streams
already under way hold their next one, for at most `limits.first_events_first_s`; every call, sent, refused or
failed, stops counting as new."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import StartService, run_events_of, stub
from service.coalesce import LoopLoad
from service.rpc.firsts import FirstsFirst
from service.rpc.server import Service


def _saturated() -> LoopLoad:
    """A loop load that reads saturated (no probe moves it)."""
    load = LoopLoad()
    load.busy = 1.0
    return load


async def _until(condition: Callable[[], bool]) -> None:
    """Turns of the loop (and the wire) until `condition` holds, for at most 5 s."""
    async with asyncio.timeout(5):
        while not condition():  # noqa: ASYNC110 (the stream holds on the other side of the wire: no event of ours)
            await asyncio.sleep(0.001)


# a run that goes on: its text comes 50 ms after its start, then its tool sleeps (the test cancels the call)
HANGS = [{"text": "Calling.", "tool_calls": [{"name": "sleep", "input": {"seconds": 60}}]}, {"text": "never"}]
PACED = {"pacing": {"first_token_ms": 50, "token_interval_ms": 0}}


async def _going_on(start_service: StartService, hold_s: float, load: LoopLoad) -> tuple[Service, FirstsFirst]:
    """A service whose runs go on (`HANGS`, paced), its streams holding at most `hold_s`, its loop reading `load`."""
    svc = await start_service(HANGS, model=PACED, limits={"first_events_first_s": hold_s})
    firsts = svc.servicer.firsts
    firsts.load = load
    return svc, firsts


async def test_a_stream_under_way_holds_until_the_new_call_has_sent_its_first_event(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    svc, firsts = await _going_on(start_service, 5, _saturated())
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="hello"))
    events = aiter(call)
    first = await anext(events)
    assert first.WhichOneof("event") == "run_started"
    firsts.pending += 1  # a new call, started and not yet sent its first event
    following = asyncio.ensure_future(anext(events))
    await _until(lambda: firsts.held == 1)
    assert not following.done()
    firsts.end()  # it has sent its first event: the streams under way go on
    assert (await following).WhichOneof("event") == "text_delta"
    assert firsts.pending == 0
    call.cancel()


async def test_the_stream_of_an_ended_run_drains_without_holding(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    svc = await start_service(limits={"first_events_first_s": 5})
    firsts = svc.servicer.firsts
    client = stub(channel_to(svc))
    events = await run_events_of(client.RunAgent(pb.RunAgentRequest(message="hello")))
    firsts.load = _saturated()
    firsts.pending += 1  # a new call pending; the run has ended: its events are all there, sending them ends the call
    async with asyncio.timeout(2):  # a hold would last 5 s an event
        watched = await run_events_of(client.WatchRun(pb.WatchRunRequest(run_id=events[0].run_id)))
    assert len(watched) == len(events)
    assert firsts.held == 0


async def test_a_hold_lasts_at_most_its_bound(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    svc, firsts = await _going_on(start_service, 0.01, _saturated())
    firsts.pending += 1  # a new call that never sends its first event: the streams under way still move on
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="hello"))
    async with asyncio.timeout(5):
        kinds = [(await anext(aiter(call))).WhichOneof("event") for _ in range(3)]
    assert kinds[:2] == ["run_started", "text_delta"]  # each held 0.01 s at most, the new call still pending
    assert firsts.pending == 1
    call.cancel()


async def test_every_call_stops_counting_as_new_sent_refused_or_watching(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    svc = await start_service()
    firsts = svc.servicer.firsts
    client = stub(channel_to(svc))
    events = await run_events_of(client.RunAgent(pb.RunAgentRequest(message="hello")))
    assert firsts.pending == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run_events_of(client.RunAgent(pb.RunAgentRequest(message="  ")))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert firsts.pending == 0
    watched = await run_events_of(client.WatchRun(pb.WatchRunRequest(run_id=events[0].run_id)))
    assert len(watched) == len(events)
    assert firsts.pending == 0


class _Context:
    """The little of a ServicerContext a started stream touches."""

    def time_remaining(self) -> float | None:
        return None


async def test_a_stream_closed_while_its_first_event_waits_to_be_sent_stops_counting(
    start_service: StartService,
) -> None:
    svc = await start_service()
    firsts = svc.servicer.firsts
    stream = svc.servicer.RunAgent(pb.RunAgentRequest(message="hello"), _Context())
    first = await anext(stream)  # handed to the transport, not yet sent: the call still counts as new
    assert first.WhichOneof("event") == "run_started"
    assert firsts.pending == 1
    await stream.aclose()  # the transport gives up on it (the caller left): GeneratorExit at the first yield
    assert firsts.pending == 0


async def test_a_loop_with_time_to_spare_holds_no_stream(
    start_service: StartService, channel_to: Callable[..., grpc.aio.Channel]
) -> None:
    # idle: a steady flow of new calls must not slow the streams under way
    svc, firsts = await _going_on(start_service, 5, LoopLoad())
    firsts.pending += 1
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="hello"))
    async with asyncio.timeout(2):  # a hold would last 5 s
        kinds = [(await anext(aiter(call))).WhichOneof("event") for _ in range(2)]
    assert kinds == ["run_started", "text_delta"]
    call.cancel()


def test_no_hold_without_a_new_call_or_with_the_hold_off() -> None:
    async def scenario() -> None:
        off = FirstsFirst(0, _saturated())
        off.pending = 3
        await off.wait()  # the hold is off: returns at once
        idle = FirstsFirst(5, _saturated())
        await idle.wait()  # nothing pending: returns at once
        assert off.held == idle.held == 0

    asyncio.run(scenario())


async def test_a_stream_whose_run_is_near_its_deadline_does_not_hold() -> None:
    """An outside finding: calls whose deadline fell during a burst of 300 new streams got no error event: their
    stream held its next event behind the new calls (up to `hold_s`) past the deadline."""
    firsts = FirstsFirst(5.0, _saturated())
    firsts.pending = 1  # a new call has not sent its first event
    now = asyncio.get_running_loop().time()
    async with asyncio.timeout(1):  # a hold would last 5 s
        await firsts.wait(now + 4.9)  # the run ends in less than a hold
    assert firsts.held == 0
    held = asyncio.ensure_future(firsts.wait(now + 60))  # a run far from its deadline holds as before
    await _until(lambda: firsts.held == 1)
    firsts.end()
    await held
