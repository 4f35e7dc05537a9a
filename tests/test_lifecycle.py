"""Run lifecycle over real gRPC: resume after a dropped stream, watchers, CancelRun, idempotency, background runs,
deadlines, slow readers and the unary call."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agent.v1 import agent_pb2 as pb
from conftest import run_events, run_events_of, stub
from fake_tools import Stubborn, all_tools
from service.run import RunState

SLOW_TOOL = [
    {"text": "Working.", "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]},
    {"text": "never"},
]
WORDS = " ".join(f"word{i}" for i in range(60))


async def until(call: Any, kind: str, seen: list[pb.AgentEvent]) -> None:
    async for event in call:
        seen.append(event)
        if event.HasField(kind):
            return
    raise AssertionError(f"no {kind} event")


async def status_of(call: Any, seen: list[pb.AgentEvent]) -> grpc.StatusCode:
    try:
        async for event in call:
            seen.append(event)
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def test_dropped_continue_stream_resumes_with_watch_run_without_gap_or_duplicate(
    start_service: Any, channel_to: Any
) -> None:
    turns = [{"text": WORDS, "tool_calls": [{"name": "sleep", "input": {"seconds": 0.2}}]}, {"text": WORDS}]
    svc = await start_service(turns, model={"pacing": {"first_token_ms": 1, "token_interval_ms": 1}})
    channel = channel_to(svc)
    first: list[pb.AgentEvent] = []
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE))
    await until(call, "tool_call_ready", first)
    call.cancel()  # the stream drops mid-run; the run goes on
    run_id, last = first[0].run_id, first[-1].seq
    rest = [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=last))]
    run = svc.registry.get(run_id)
    assert covered(first + rest) == list(range(1, len(run.log) + 1))
    assert rest[-1].HasField("final_response")


async def test_cancel_on_disconnect_is_the_default(start_service: Any, channel_to: Any) -> None:
    tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=tools)
    seen: list[pb.AgentEvent] = []
    request = pb.RunAgentRequest(message="go", idempotency_key="k")
    call = stub(channel_to(svc)).RunAgent(request)
    await until(call, "tool_call_ready", seen)
    call.cancel()
    run = svc.registry.get(seen[0].run_id)
    assert run.task is not None
    await asyncio.wait_for(run.task, 5)
    assert run.state.value == "cancelled" and tools["sleep"].cancelled == 1  # type: ignore[attr-defined]
    # a retry with the key replays that run to its cancel, whose message says what to do instead (an outside
    # finding: "the caller cancelled or disconnected" read as the retry's own doing)
    again = stub(channel_to(svc)).RunAgent(request)
    replay: list[pb.AgentEvent] = []
    with pytest.raises(grpc.aio.AioRpcError) as err:
        replay.extend([event async for event in again])
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert "send a new key to run again, or on_disconnect CONTINUE" in err.value.details()


async def test_continue_runs_outlive_their_call_and_its_deadline(start_service: Any, channel_to: Any) -> None:
    """CONTINUE: neither the streaming call's deadline nor a unary caller going away stops the run; the same
    idempotency key attaches the unary caller to it again."""
    svc = await start_service([{"tool_calls": [{"name": "sleep", "input": {"seconds": 0.5}}]}, {"text": "done"}])
    channel = channel_to(svc)
    cont = pb.RunAgentRequest.CONTINUE
    seen: list[pb.AgentEvent] = []
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="go", on_disconnect=cont), timeout=0.2)
    assert await status_of(call, seen) == grpc.StatusCode.DEADLINE_EXCEEDED
    streamed = svc.registry.get(seen[0].run_id)
    unary = stub(channel).RunAgentUnary(pb.RunAgentRequest(message="go", on_disconnect=cont, idempotency_key="k"))
    await asyncio.sleep(0.1)
    unary.cancel()
    again = await stub(channel).RunAgentUnary(pb.RunAgentRequest(message="go", on_disconnect=cont, idempotency_key="k"))
    assert again.final_response.text == "done"
    assert streamed.task is not None
    await asyncio.wait_for(streamed.task, 5)
    assert streamed.state.value == "succeeded"


async def test_disconnect_while_a_write_is_stuck_still_cancels_the_run(start_service: Any, channel_to: Any) -> None:
    """A client that stops reading and then gives up: its cancel lands while the server waits to send, where grpc
    closes the stream's generator (GeneratorExit) instead of cancelling it. The owned run must stop all the same."""
    tools = all_tools()
    big = "x" * 2_000_000  # one delta larger than the HTTP/2 window: its write waits for a reader
    turns = [{"text": f"{big} {big}", "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}, {"text": "never"}]
    svc = await start_service(turns, tools=tools)
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go"))
    first = await call.read()
    assert isinstance(first, pb.AgentEvent) and first.HasField("run_started")
    await asyncio.wait_for(tools["sleep"].running.wait(), 5)  # type: ignore[attr-defined]
    run = svc.registry.get(first.run_id)
    assert not run.finished  # the run went on while its stream waited on the unread write
    call.cancel()
    assert run.task is not None
    await asyncio.wait_for(asyncio.shield(run.task), 5)
    assert run.state.value == "cancelled" and tools["sleep"].cancelled == 1  # type: ignore[attr-defined]


async def test_two_watchers_see_identical_sequences(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(
        [{"text": WORDS}],
        model={"pacing": {"first_token_ms": 5, "token_interval_ms": 1}},
        runs={"subscriber_coalesce_lag": 10_000},  # so that neither gets merged deltas the other does not
    )
    channel = channel_to(svc)
    submitted = await stub(channel).SubmitRun(pb.RunAgentRequest(message="go"))
    a, b = await asyncio.gather(
        *(run_events_of(stub(channel).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))) for _ in range(2))
    )
    assert [e.SerializeToString() for e in a] == [e.SerializeToString() for e in b]
    assert a[-1].HasField("final_response") and a[-1].run_id == submitted.run_id


@pytest.mark.parametrize("mode", [pb.CancelRunRequest.IMMEDIATE, pb.CancelRunRequest.AFTER_TURN])
async def test_cancel_run_during_a_slow_tool(start_service: Any, channel_to: Any, mode: int) -> None:
    tools = all_tools()
    turns = [{"tool_calls": [{"name": "sleep", "input": {"seconds": 0.3}}]}, {"text": "never"}]
    svc = await start_service(turns, tools=tools)
    channel = channel_to(svc)
    seen: list[pb.AgentEvent] = []
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="go"))
    await until(call, "tool_call_ready", seen)
    reply = await stub(channel).CancelRun(pb.CancelRunRequest(run_id=seen[0].run_id, mode=mode))
    assert reply.run_id == seen[0].run_id
    await stub(channel).CancelRun(pb.CancelRunRequest(run_id=seen[0].run_id, mode=mode))  # idempotent while ending
    assert await status_of(call, seen) == grpc.StatusCode.CANCELLED
    result = next(e.tool_result for e in seen if e.HasField("tool_result"))
    assert seen[-1].error.code == "CANCELLED"
    if mode == pb.CancelRunRequest.IMMEDIATE:
        assert reply.state == pb.Run.CANCELLED
        assert result.status == pb.TOOL_STATUS_CANCELLED and tools["sleep"].cancelled == 1  # type: ignore[attr-defined]
        assert seen[-1].error.message == "cancelled by CancelRun"
    else:
        assert result.status == pb.TOOL_STATUS_OK and tools["sleep"].finished == 1  # type: ignore[attr-defined]
        assert seen[-1].error.message == "cancelled by CancelRun after the current turn"
    again = await stub(channel).CancelRun(pb.CancelRunRequest(run_id=seen[0].run_id))
    assert again.state == pb.Run.CANCELLED


async def test_cancelling_a_finished_run_is_failed_precondition(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    channel = channel_to(svc)
    events = await run_events(channel)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel).CancelRun(pb.CancelRunRequest(run_id=events[0].run_id))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended (succeeded); nothing to cancel" in (info.value.details() or "")


async def test_unknown_runs_are_not_found(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    channel = channel_to(svc)
    calls = [
        stub(channel).GetRun(pb.GetRunRequest(run_id="run_nope")),
        stub(channel).CancelRun(pb.CancelRunRequest(run_id="run_nope")),
        run_events_of(stub(channel).WatchRun(pb.WatchRunRequest(run_id="run_nope"))),
    ]
    for call in calls:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        assert "no run 'run_nope'" in (info.value.details() or "")


async def test_idempotency_key_attaches_to_the_same_run(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    channel = channel_to(svc)
    first = await run_events(channel, message="once", idempotency_key="k-1")
    again = await run_events(channel, message="once", idempotency_key="k-1")
    assert [e.SerializeToString() for e in first] == [e.SerializeToString() for e in again]
    other = await run_events(channel, message="once", idempotency_key="k-2")
    assert other[0].run_id != first[0].run_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel, message="something else", idempotency_key="k-1")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert f"used by run {first[0].run_id} with a different request" in (info.value.details() or "")
    # the same run asked for in other words is the same request (an outside finding: both were ALREADY_EXISTS)
    tools = await run_events(channel, message="once", tools=["echo", "sleep"], idempotency_key="k-3")
    reordered = await run_events(channel, message="once", tools=["sleep", "echo"], idempotency_key="k-3")
    assert reordered[0].run_id == tools[0].run_id
    spelled_out = await run_events(channel, message="once", max_turns=10, idempotency_key="k-1")  # 10: the default
    assert spelled_out[0].run_id == first[0].run_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel, message="once", max_turns=9, idempotency_key="k-1")
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS


async def test_background_run_to_completion_and_full_queue(start_service: Any, channel_to: Any, tmp_path: Path) -> None:
    svc = await start_service(runs={"background_max_concurrent": 1, "background_max_queued": 1})
    channel = channel_to(svc)
    submitted = await stub(channel).SubmitRun(pb.RunAgentRequest(message="background"))
    assert submitted.run_id.startswith("run_")
    for _ in range(200):
        run = await stub(channel).GetRun(pb.GetRunRequest(run_id=submitted.run_id))
        if run.state == pb.Run.SUCCEEDED:
            break
        await asyncio.sleep(0.01)
    assert run.state == pb.Run.SUCCEEDED and run.final_response.text.startswith("The answer: ")
    assert run.last_seq > 5 and run.ended.seconds > 0
    # a second service running beside the first: its own data folder (one audit log has one writer)
    slow = await start_service(
        SLOW_TOOL, runs={"background_max_concurrent": 1, "background_max_queued": 1}, data_dir=tmp_path / "slow"
    )
    slow_channel = channel_to(slow)
    await stub(slow_channel).SubmitRun(pb.RunAgentRequest(message="1"))
    queued = await stub(slow_channel).SubmitRun(pb.RunAgentRequest(message="2"))
    assert queued.state == pb.Run.QUEUED
    third = stub(slow_channel).SubmitRun(pb.RunAgentRequest(message="3"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await third
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "background queue is full" in (info.value.details() or "")
    status, full = await rpc_status.aio.from_call(third), error_details_pb2.ErrorInfo()
    assert status is not None and status.details[0].Unpack(full)  # "retry later", and retryable says so too
    assert (full.reason, dict(full.metadata)) == ("QUEUE_FULL", {"retryable": "true"})
    with pytest.raises(grpc.aio.AioRpcError) as ahead:
        await anext(aiter(stub(slow_channel).WatchRun(pb.WatchRunRequest(run_id=queued.run_id, after_seq=5))))
    assert ahead.value.details() == f"after_seq=5, but run {queued.run_id} is queued, at seq 1"
    # a queued run has no turn to finish: AFTER_TURN cancels it at once, and says so (it answered QUEUED)
    after_turn = pb.CancelRunRequest(run_id=queued.run_id, mode=pb.CancelRunRequest.AFTER_TURN)
    assert (await stub(slow_channel).CancelRun(after_turn)).state == pb.Run.CANCELLED
    assert (await stub(slow_channel).GetRun(pb.GetRunRequest(run_id=queued.run_id))).state == pb.Run.CANCELLED


async def test_deadline_shorter_than_a_tool_ends_with_an_error_event(start_service: Any, channel_to: Any) -> None:
    tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=tools)
    seen: list[pb.AgentEvent] = []
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go"), timeout=1.0)
    assert await status_of(call, seen) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert seen[-1].error.code == "DEADLINE_EXCEEDED"  # the caller was told before its deadline cut the stream
    result = next(e.tool_result for e in seen if e.HasField("tool_result"))
    assert result.status == pb.TOOL_STATUS_CANCELLED
    assert tools["sleep"].cancelled == 1  # type: ignore[attr-defined]


async def test_a_deadline_before_a_tool_that_ignores_its_cancel_still_ends_with_an_error_event(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: a tool that ignores its cancellation held the run's end `abandon_after_s` (0.5 s) past
    the run's deadline, the caller's deadline cut the stream first (no `error` event) and the run was recorded
    CANCELLED. Past its deadline the run abandons such a call at once."""
    stubborn = Stubborn()
    turns = [{"tool_calls": [{"name": "stubborn", "input": {"text": "x"}}]}, {"text": "never"}]
    svc = await start_service(turns, tools={**all_tools(), "stubborn": stubborn})
    try:
        seen: list[pb.AgentEvent] = []
        call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go"), timeout=1.0)
        assert await status_of(call, seen) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert seen[-1].error.code == "DEADLINE_EXCEEDED"  # sent before the caller's deadline cut the stream
        run = svc.registry.get(seen[0].run_id)
        assert run.state is RunState.FAILED and stubborn.cancels >= 1
    finally:
        stubborn.release.set()


def covered(events: list[pb.AgentEvent]) -> list[int]:
    return [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)]


async def test_a_slow_reader_slows_neither_the_run_nor_a_fast_reader(start_service: Any, channel_to: Any) -> None:
    # Dropping a reader that falls past `subscriber_max_lag` is tested in test_runs.py: over real HTTP/2 a stalled
    # reader is only "behind" once flow control stops its writes, which takes megabytes of buffered data.
    svc = await start_service([{"text": WORDS}], runs={"coalesce_window_s": 0, "subscriber_coalesce_lag": 10})
    channel = channel_to(svc)
    submitted = await stub(channel).SubmitRun(pb.RunAgentRequest(message="go"))
    run = svc.registry.get(submitted.run_id)
    slow_seen: list[pb.AgentEvent] = []
    ended_while_slow_was_reading = False

    async def slow() -> None:
        nonlocal ended_while_slow_was_reading
        async for event in stub(channel_to(svc)).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id)):
            slow_seen.append(event)
            if len(slow_seen) == 3:
                for _ in range(500):  # reads nothing more until the run has ended (within 5 s)
                    if run.finished:
                        break
                    await asyncio.sleep(0.01)
                ended_while_slow_was_reading = run.finished

    fast, _ = await asyncio.gather(
        run_events_of(stub(channel).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))), slow()
    )
    assert ended_while_slow_was_reading
    every_seq = list(range(1, len(run.log) + 1))
    assert covered(fast) == every_seq and fast[-1].HasField("final_response")
    assert covered(slow_seen) == every_seq  # the slow one got merged deltas, still accounting for every seq
    assert any(e.first_seq for e in slow_seen)
    text = "".join(e.text_delta.text for e in slow_seen if e.HasField("text_delta"))
    assert text == "".join(e.text_delta.text for e in fast if e.HasField("text_delta")) == WORDS


async def test_unary_result_equals_what_the_stream_said(start_service: Any, channel_to: Any) -> None:
    turns = [
        {"tool_calls": [{"name": "echo", "input": {"text": "a"}}, {"name": "count", "input": {"n": 2}}]},
        {"text": "Final words."},
    ]
    svc = await start_service(turns)
    channel = channel_to(svc)
    streamed = await run_events(channel, message="q")
    result = await stub(channel).RunAgentUnary(pb.RunAgentRequest(message="q"))
    final = streamed[-1].final_response
    assert result.final_response.text == final.text == "Final words."
    assert (result.final_response.turns, result.final_response.tool_calls) == (final.turns, final.tool_calls)
    stream_results = [e.tool_result for e in streamed if e.HasField("tool_result")]
    assert [c.name for c in result.tool_calls] == ["echo", "count"]
    assert [dict(c.input) for c in result.tool_calls] == [{"text": "a"}, {"n": 2.0}]
    by_name = {r.name: r for r in stream_results}
    for call in result.tool_calls:
        assert call.result.status == by_name[call.name].status
        assert call.result.data == by_name[call.name].data
    own = await run_events_of(stub(channel).WatchRun(pb.WatchRunRequest(run_id=result.run_id)))
    assert result.last_seq == len(own)


async def test_unary_failure_is_a_status(start_service: Any, channel_to: Any) -> None:
    call = {"tool_calls": [{"name": "echo", "input": {"text": "again"}}]}
    svc = await start_service([call, call, call])
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub(channel_to(svc)).RunAgentUnary(pb.RunAgentRequest(message="loop", max_turns=1))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_drain_interrupts_background_runs_with_a_retryable_error(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(SLOW_TOOL)
    channel = channel_to(svc)
    request = pb.RunAgentRequest(message="go", durability=pb.RunAgentRequest.NOT_DURABLE)  # durable: handed over
    submitted = await stub(channel).SubmitRun(request)
    await asyncio.sleep(0.1)
    watch = stub(channel).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))
    seen: list[pb.AgentEvent] = []
    drain = asyncio.create_task(svc.drain(grace=0.1))
    assert await status_of(watch, seen) == grpc.StatusCode.UNAVAILABLE
    await drain
    assert seen[-1].error.retryable and submitted.run_id in seen[-1].error.message


async def test_watch_after_a_seq_not_logged_yet_is_out_of_range_live_or_ended(
    start_service: Any, channel_to: Any
) -> None:
    """The same answer whether the run still runs or has ended: it used to wait for a live run to end, then end OK
    with no events."""
    svc = await start_service(SLOW_TOOL)
    channel = channel_to(svc)
    submitted = await stub(channel).SubmitRun(pb.RunAgentRequest(message="go"))
    watch = stub(channel).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id, after_seq=1000), timeout=2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events_of(watch)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert "after_seq=1000" in str(info.value.details()) and "is running" in str(info.value.details())
    await stub(channel).CancelRun(pb.CancelRunRequest(run_id=submitted.run_id))
    ended = stub(channel).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id, after_seq=1000), timeout=2)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events_of(ended)
    assert info.value.code() == grpc.StatusCode.OUT_OF_RANGE and "ended at seq" in str(info.value.details())


async def test_cancel_run_and_drain_do_not_wait_for_a_tool_that_ignores_cancellation(
    start_service: Any, channel_to: Any
) -> None:
    stubborn = Stubborn()
    turns = [{"tool_calls": [{"name": "stubborn", "input": {"text": "x"}}]}, {"text": "never"}]
    svc = await start_service(turns, tools={**all_tools(), "stubborn": stubborn})
    svc.registry.loop.abandon_after_s = 0.05
    channel = channel_to(svc)
    try:
        cancelled = await stub(channel).SubmitRun(pb.RunAgentRequest(message="go"))
        await asyncio.wait_for(stubborn.running.wait(), 5)
        reply = await stub(channel).CancelRun(pb.CancelRunRequest(run_id=cancelled.run_id))
        assert reply.state == pb.Run.CANCELLED
        seen: list[pb.AgentEvent] = []
        watch = stub(channel).WatchRun(pb.WatchRunRequest(run_id=cancelled.run_id))
        assert await status_of(watch, seen) == grpc.StatusCode.CANCELLED
        result = next(e.tool_result for e in seen if e.HasField("tool_result"))
        assert result.status == pb.TOOL_STATUS_CANCELLED and seen[-1].error.code == "CANCELLED"

        stubborn.running.clear()
        interrupted = await stub(channel).SubmitRun(
            pb.RunAgentRequest(message="go", durability=pb.RunAgentRequest.NOT_DURABLE)
        )
        await asyncio.wait_for(stubborn.running.wait(), 5)
        started = time.monotonic()
        drain = asyncio.create_task(svc.drain(grace=0.1))
        done, _ = await asyncio.wait({drain}, timeout=5)  # not wait_for: it would wait for the tool too
        assert done, "drain waited for a tool that ignored its cancellation"
        assert time.monotonic() - started < 3
        assert svc.registry.get(interrupted.run_id).state is RunState.FAILED
        assert stubborn.ended == 0  # both calls abandoned, still running
    finally:
        stubborn.release.set()
