"""The run ends early enough for its DEADLINE_EXCEEDED `error` event to reach the caller, whatever the deadline,
though gRPC rounds the caller's timeout up when it sends it (by nearly a second at 2 minutes).

The rounding is checked two ways without waiting for the deadlines: the margin against gRPC's encoding rules for
every millisecond from 1 s to 2 min, and, for deadlines from 1 s to 2 min (and beyond), the run's deadline on a real
server against the deadline a real grpc client set. One run with a short deadline is waited out."""

from __future__ import annotations

import asyncio
import math
from typing import Any

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.aio import cancel_and_wait
from service.deadline import REUSED_SHARE, WAITED_SHARE, header_rounding_s, run_margin_s
from service.errors import DeadlineTooShort

SLOW_TOOL = [
    {"text": "Working.", "tool_calls": [{"name": "sleep", "input": {"seconds": 60}}]},
    {"text": "never"},
]
FIXED = 0.05  # runs.deadline_margin_s, the default
ERROR_EVENT_TIME = 0.03  # what the run must leave, at least, for its error event to be sent and read


def sent_timeout(seconds: float) -> float:
    """The timeout the server reads when a grpcio client sends `seconds`: gRPC's C core sends whole milliseconds
    rounded up, and from 1 s on keeps three significant figures, rounding up (10 ms steps to 10 s, 100 ms to 100 s,
    whole seconds to 1000 s, 10 s to 10,000 s). Written from its rules, and checked against a real client below."""
    ms = math.ceil(round(seconds * 1000, 6))
    for below_ms, step_ms in ((1_000, 1), (10_000, 10), (100_000, 100), (1_000_000, 1_000), (10_000_000, 10_000)):
        if ms < below_ms:
            return -(-ms // step_ms) * step_ms / 1000
    raise ValueError("beyond the range tested")


async def test_a_real_grpc_client_rounds_its_timeout_as_the_rules_say() -> None:
    """The rules above against grpcio itself: what a server reads from a real client's header."""
    seen: list[float] = []

    async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        seen.append(context.time_remaining())
        return b""

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("t.T", {"M": grpc.unary_unary_rpc_method_handler(handler)})]
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    timeouts = [0.5, 1.001, 9.991, 10.001, 59.001, 99.95, 100.001, 119.001, 120.0, 1000.5]
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/t.T/M")
            for timeout in timeouts:
                await call(b"", timeout=timeout)
    finally:
        await server.stop(0)
    for timeout, remaining in zip(timeouts, seen, strict=True):
        # between what the header says less the time the call took to arrive, and what it says if the client's
        # clock read a millisecond late
        assert sent_timeout(timeout) - 0.02 < remaining <= sent_timeout(timeout + 0.001), timeout
    assert sent_timeout(100.001) == 101 and sent_timeout(119.001) == 120 and sent_timeout(10.001) == 10.1


@pytest.mark.parametrize("reused", [False, True])  # the header of an earlier call up to 3 % longer, sent again
@pytest.mark.parametrize("slop_s", [0.0, 0.001])  # the client's clock may read a millisecond late
@pytest.mark.parametrize("waited", [0.0, WAITED_SHARE])  # before the servicer read the time left
def test_every_deadline_from_1_s_to_2_min_leaves_time_for_the_error_event(
    slop_s: float, waited: float, reused: bool
) -> None:
    worst_left = math.inf
    for ms in range(1000, 120_001):
        timeout = ms / 1000
        header = sent_timeout(timeout + slop_s) / (0.97 if reused else 1.0)
        wait = waited if waited < WAITED_SHARE else waited * timeout
        seen = header - wait  # the servicer's time_remaining()
        ends = wait + seen - run_margin_s(seen, FIXED)  # after the caller sent the call
        left = timeout - ends
        worst_left = min(worst_left, left)
        assert left >= FIXED - slop_s - 1e-9, timeout
        # never much more than 4 % of the deadline is given up (1 % of rounding, 3 % of reuse)
        assert left <= FIXED + (0.0102 + REUSED_SHARE) * timeout, timeout
    # and the bound is tight: not padded beyond the rounding and the reuse
    assert worst_left < FIXED + (0.003 if reused else REUSED_SHARE + 0.002)


def test_the_margin_is_the_header_precision_plus_the_fixed_part() -> None:
    assert header_rounding_s(0.2) == 0.001 and header_rounding_s(5) == 0.01
    assert header_rounding_s(10) == 0.1 and header_rounding_s(120) == 1 and header_rounding_s(3600) == 10
    assert header_rounding_s(99_999) == 100 and header_rounding_s(7 * 86_400) == header_rounding_s(math.inf) == 6000
    assert run_margin_s(120, FIXED) == pytest.approx(1 + 120 * REUSED_SHARE + FIXED)
    assert run_margin_s(99.5, FIXED) == pytest.approx(1 + 99.5 * REUSED_SHARE + FIXED)  # a 101 s header after 1.5 s
    # a short deadline is not eaten by the fixed part
    assert run_margin_s(0.2, FIXED) == pytest.approx(0.001 + 0.2 * REUSED_SHARE + 0.02)


def test_a_busy_loop_adds_to_the_margin_from_half_a_core_to_saturated() -> None:
    def busy_part(remaining: float, busy: float) -> float:
        return round(run_margin_s(remaining, FIXED, busy=busy, busy_s=0.15) - run_margin_s(remaining, FIXED), 9)

    assert busy_part(5.0, 0.0) == busy_part(5.0, 0.5) == 0  # an idle or half-busy loop: the fixed part only
    assert busy_part(5.0, 0.7) == 0.075  # half-way to saturated: half of it
    assert busy_part(5.0, 0.9) == busy_part(5.0, 1.0) == 0.15
    assert busy_part(0.4, 1.0) == 0.1  # never more than a quarter of what is left
    assert run_margin_s(5.0, FIXED, busy=1.0) == run_margin_s(5.0, FIXED)  # runs.deadline_busy_margin_s 0: none


async def test_a_run_started_on_a_saturated_loop_ends_earlier(start_service: Any, channel_to: Any) -> None:
    """An outside finding: on a saturated server (400 paced streams on 2 cores) 34 of 240 calls whose deadline fell
    inside the run got no `error` event: it waited behind other calls' work longer than the 50 ms margin."""
    svc = await start_service(SLOW_TOOL, runs={"deadline_busy_margin_s": 0.4})
    channel = channel_to(svc)
    await stub(channel).ListTools(pb.ListToolsRequest())
    ends = []
    for busy in (1.0, 0.0):
        if svc.registry._load_probe is not None:  # started with the first run: the busy share stays as set here
            await cancel_and_wait([svc.registry._load_probe], 5)
        svc.registry.load.busy = busy
        loop = asyncio.get_running_loop()
        sent = loop.time()
        call = stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=10.0)
        first = await call.read()
        deadline = svc.registry.get(first.run_id).control.deadline
        call.cancel()
        assert deadline is not None
        ends.append(sent + 10.0 - deadline)
    assert ends[1] < FIXED + (0.0102 + REUSED_SHARE) * 10 + 0.05, ends
    assert 0.3 < ends[0] - ends[1] < 0.5, ends  # 0.4 s apart, give or take the trip


# each just past a step of the header, most of a step below the next one (the client connects before it sends)
@pytest.mark.parametrize("timeout", [1.0, 1.02, 5.05, 9.99, 10.02, 30.05, 59.02, 99.95, 100.2, 119.2, 120.0, 150.5])
async def test_the_run_ends_before_a_real_clients_deadline(
    timeout: float,  # noqa: ASYNC109 (the call's, not this function's)
    start_service: Any,
    channel_to: Any,
) -> None:
    """The run's deadline on the server, as the real client's header gave it, against the client's own deadline:
    read as soon as the run starts, then the call is cancelled, so no deadline is waited for."""
    svc = await start_service(SLOW_TOOL, runs={"deadline_busy_margin_s": 0})  # the header's part, not the load's
    channel = channel_to(svc)
    # connected and warm first: what is measured is the deadline's trip, not a first call's set-up on a busy machine
    await stub(channel).ListTools(pb.ListToolsRequest())
    loop = asyncio.get_running_loop()
    sent = loop.time()  # the client's deadline is set after this: `sent + timeout` is at or before it
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=timeout)
    first = await call.read()
    deadline = svc.registry.get(first.run_id).control.deadline
    call.cancel()
    assert deadline is not None
    left = sent + timeout - deadline
    assert left >= ERROR_EVENT_TIME, f"the run ends {left:.3f} s before the caller's deadline of {timeout} s"
    assert left <= FIXED + (0.0102 + REUSED_SHARE) * timeout + 0.05  # and not much earlier than it must


async def test_a_short_deadline_gets_its_error_event_before_it_cuts_the_stream(
    start_service: Any, channel_to: Any
) -> None:
    # a margin of 0.3 s, not the default 50 ms: what is tested is that the run's error event comes before the cut,
    # which a 2-core machine running the suite's other tests cannot promise within 50 ms
    svc = await start_service(SLOW_TOOL, runs={"deadline_margin_s": 0.3})
    loop = asyncio.get_running_loop()
    sent = loop.time()
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go"), timeout=3.009)  # sent as 3.01 s
    events: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for event in call:
            events.append(event)
    got = loop.time()
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert events[-1].error.code == "DEADLINE_EXCEEDED"
    assert got < sent + 3.009


async def test_a_call_sent_with_an_earlier_calls_header_still_gets_its_error_event(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: grpcio sends an earlier call's grpc-timeout again when a new call's is shorter by less than
    3 % (HPACK): a 2.915 s call sent 50 ms after a 3.0 s one on the same channel was seen as 2.999 s, and its run
    ended after the caller's deadline (no error event, recorded CANCELLED)."""
    svc = await start_service(SLOW_TOOL, runs={"deadline_busy_margin_s": 0})
    channel = channel_to(svc)
    await stub(channel).ListTools(pb.ListToolsRequest())
    loop = asyncio.get_running_loop()
    first = stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=3.0)
    await first.read()
    await asyncio.sleep(0.05)  # the header's 3.0 s would now be 2.95 s: the next call's is 1.2 % shorter
    sent = loop.time()
    second = stub(channel).RunAgent(pb.RunAgentRequest(message="go"), timeout=2.915)
    started = await second.read()
    deadline = svc.registry.get(started.run_id).control.deadline
    first.cancel()
    second.cancel()
    assert deadline is not None
    left = sent + 2.915 - deadline
    assert left >= ERROR_EVENT_TIME, f"the run ends {left:.3f} s before the caller's deadline"


async def test_a_deadline_too_near_for_a_run_and_its_error_event_is_refused_before_it_starts(
    start_service: Any,
) -> None:
    """An outside finding: with 1-10 ms deadlines the run sent `run_started`, and its `error` event came after the
    caller's deadline had cut the stream."""
    svc = await start_service(SLOW_TOOL)
    api, anonymous = svc.servicer.api, svc.servicer.anonymous
    with pytest.raises(DeadlineTooShort) as refused:
        await api.start(pb.RunAgentRequest(message="go"), anonymous, remaining_s=0.008, background=False)
    assert refused.value.code == "DEADLINE_EXCEEDED" and "8.0 ms away" in refused.value.message
    assert svc.registry.runs == {}  # no run started
    run, created = await api.start(pb.RunAgentRequest(message="go"), anonymous, remaining_s=0.03, background=False)
    assert created and run.control.deadline is not None  # 30 ms: enough to start and to fail in time
    svc.registry.cancel(run)
