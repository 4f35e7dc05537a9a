"""Durable runs in the service on one node (the embedded default: checkpoints in a SQLite file under data_dir): what a
durable run records, and a drain that hands a run over to the next start instead of failing it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sqlite3
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import RedisNamespace, audit_key_file

from agent.v1 import agent_pb2 as pb
from conftest import ECHO_THEN_ANSWER, run_events, stub
from fake_tools import all_tools
from service import events as ev
from service.aio import cancel_and_wait
from service.durable.sqlite import DEFAULT_FILE
from service.run import RunState

SLOW_TOOL = [
    {"text": "Working.", "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]},
    {"text": "done"},
]


def checkpoints(tmp_path: Path) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(run owner, state) of every durable run and (run id, kind) of every step, as the file holds them."""
    with sqlite3.connect(tmp_path / "var" / DEFAULT_FILE) as db:
        runs = db.execute("SELECT owner, state FROM durable_runs ORDER BY created").fetchall()
        steps = db.execute("SELECT run_id, kind FROM run_steps ORDER BY run_id, step_no").fetchall()
    return runs, steps


async def test_a_durable_run_is_checkpointed_per_model_turn_and_tool_call_not_per_event(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    svc = await start_service(ECHO_THEN_ANSWER)
    channel = channel_to(svc)
    events = await run_events(channel, on_disconnect=pb.RunAgentRequest.CONTINUE)
    assert events[-1].HasField("final_response")
    await asyncio.wait_for(svc.registry.get(events[0].run_id).task, 5)  # its end is recorded after its last event
    await run_events(channel)  # CANCEL, the default: not durable, nothing recorded
    runs, steps = checkpoints(tmp_path)
    assert [state for _, state in runs] == ["succeeded"]
    # echo may change something (unsafe): its intent is committed before it runs
    assert [kind for _, kind in steps] == ["turn", "intent", "tool", "turn"]
    assert len(events) > len(steps)  # deltas and the rest are not checkpointed


async def test_drain_hands_a_durable_run_over_and_the_next_start_continues_it(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """The drained stream ends UNAVAILABLE (RUN_HANDED_OVER, where to watch from); the run is released, not failed;
    the next start on the data_dir claims it: turn 1 is not requested again, the sleep call it cut off (unsafe) is
    not run again but ends OUTCOME_UNKNOWN, and the run finishes."""
    first_tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=first_tools)
    submitted = await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="go"))
    await asyncio.wait_for(first_tools["sleep"].running.wait(), 5)
    watch = stub(channel_to(svc)).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))
    seen = []
    drain = asyncio.create_task(svc.drain(grace=0.1))
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for event in watch:
            seen.append(event)
    await drain
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert f"after_seq={seen[-1].seq}" in str(ended.value.details())
    # one node (memory:// state): no peer takes the run, the next start on this data_dir does
    assert "it goes on when the server starts again on its data_dir: follow it" in str(ended.value.details())
    assert not any(e.HasField("error") for e in seen)  # not failed: it goes on elsewhere
    assert checkpoints(tmp_path)[0] == [("", "running")]  # released: any process may claim it

    second_tools = all_tools()
    again = await start_service(SLOW_TOOL, tools=second_tools)
    model = again.registry.loop.model
    watched = [e async for e in stub(channel_to(again)).WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))]
    # its log goes on from the events kept in data_dir/durable.db: those seen before the drain, then run_recovered
    assert watched[: len(seen)] == seen
    recovered = watched[len(seen)]
    assert recovered.run_recovered.turn == 1 and recovered.run_recovered.step_no == 2  # turn 1, the intent
    result = next(e.tool_result for e in watched if e.HasField("tool_result"))
    assert result.status == pb.TOOL_STATUS_OUTCOME_UNKNOWN and "sleep" in result.error
    assert watched[-1].final_response.text == "done"
    assert second_tools["sleep"].started == 0  # never sent again
    assert len(model.requests) == 1  # turn 2 only: turn 1 was recorded
    assert [e.seq for e in watched] == list(range(1, len(watched) + 1))
    await asyncio.wait_for(again.registry.get(submitted.run_id).task, 5)  # its end is recorded after its last event
    assert checkpoints(tmp_path)[0][0][1] == "succeeded"


async def test_runs_continued_after_a_restart_run_at_once_beyond_the_background_slots(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """An outside finding: continued runs waited for a free background slot (reading QUEUED, 9 s behind runs never
    started); they were running already, their callers follow them: they go on at once."""
    slow_twice = [*SLOW_TOOL[:1], {"text": "Again.", "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}]
    first_tools = all_tools()
    svc = await start_service(slow_twice, tools=first_tools, runs={"background_max_concurrent": 2})
    ids = [(await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="go"))).run_id for _ in range(2)]
    for _ in range(200):  # both running their sleep
        if first_tools["sleep"].started == 2:
            break
        await asyncio.sleep(0.02)
    await svc.drain(grace=0.1)  # both handed over to the next start
    second_tools = all_tools()
    again = await start_service(slow_twice, tools=second_tools, runs={"background_max_concurrent": 1})
    for _ in range(200):  # each goes on to its second turn's sleep (the first's, cut off, is OUTCOME_UNKNOWN)
        if second_tools["sleep"].started == 2:
            break
        await asyncio.sleep(0.02)
    states = [(await stub(channel_to(again)).GetRun(pb.GetRunRequest(run_id=i))).state for i in ids]
    assert states == [pb.Run.RUNNING, pb.Run.RUNNING]  # not one of them QUEUED behind the other's 30 s sleep
    # and they hold their slots (over the cap of 1): a new run waits until both have ended (another outside
    # finding: runs never started ran beside continued ones, 4 under a cap of 2)
    new = (await stub(channel_to(again)).SubmitRun(pb.RunAgentRequest(message="go"))).run_id
    for _ in range(20):  # its driver's first steps: long enough to start, had a slot been free
        await asyncio.sleep(0.01)
    assert again.registry.get(new).state is RunState.QUEUED
    for run_id in ids:
        await stub(channel_to(again)).CancelRun(pb.CancelRunRequest(run_id=run_id))
    await asyncio.wait_for(again.registry.get(new).reached(2), 5)  # let in once both slots were given back
    assert again.registry.get(new).state is RunState.RUNNING
    await stub(channel_to(again)).CancelRun(pb.CancelRunRequest(run_id=new))


async def test_a_queued_run_cancelled_before_it_started_stays_cancelled_after_a_restart(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """An outside finding: a SubmitRun cancelled while it waited for a slot ended CANCELLED, but its durable record
    stayed running, and the next start on the data_dir continued it to the end (seq 2, its error event, became
    run_recovered)."""
    tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=tools, runs={"background_max_concurrent": 1})
    api = stub(channel_to(svc))
    await api.SubmitRun(pb.RunAgentRequest(message="first"))  # takes the one slot
    queued = (await api.SubmitRun(pb.RunAgentRequest(message="second"))).run_id
    await api.CancelRun(pb.CancelRunRequest(run_id=queued))
    run = svc.registry.get(queued)
    assert run.task is not None
    await asyncio.wait_for(asyncio.shield(run.task), 5)
    before = await _watched(stub(channel_to(svc)), queued)
    assert before[-1].error.code == "CANCELLED"
    assert [state for _, state in checkpoints(tmp_path)[0]] == ["running", "cancelled"]  # its end is recorded
    await svc.drain(grace=0.1)
    again = await start_service(SLOW_TOOL, tools=all_tools(), runs={"background_max_concurrent": 1})
    assert (await stub(channel_to(again)).GetRun(pb.GetRunRequest(run_id=queued))).state == pb.Run.CANCELLED
    assert await _watched(stub(channel_to(again)), queued) == before  # its log as it was: nothing after its end


async def _watched(api: Any, run_id: str) -> list[pb.AgentEvent]:
    seen: list[pb.AgentEvent] = []
    try:
        async for event in api.WatchRun(pb.WatchRunRequest(run_id=run_id)):
            seen.append(event)
    except grpc.aio.AioRpcError:
        pass  # a run that did not succeed ends its stream with its status
    return seen


async def test_a_process_whose_run_was_claimed_stops_it_at_once_and_says_where_it_goes_on(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """The claim is the fence: once another owner is recorded (as a peer that thought this process dead writes
    it), the next checkpoint is refused, the run stops with no closing event, and its stream ends UNAVAILABLE."""
    tools = all_tools()
    turns = [{"tool_calls": [{"name": "sleep", "input": {"seconds": 0.3}}]}, {"text": "never sent from here"}]
    svc = await start_service(turns, tools=tools)
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE))
    seen = []
    async for event in call:
        seen.append(event)
        if event.HasField("tool_call"):
            break
    await asyncio.wait_for(tools["sleep"].running.wait(), 5)
    with sqlite3.connect(tmp_path / "var" / DEFAULT_FILE) as db:
        db.execute("UPDATE durable_runs SET owner = 'peer'")
    with pytest.raises(grpc.aio.AioRpcError) as ended:
        async for event in call:
            seen.append(event)
    assert ended.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "claimed by another process" in str(ended.value.details())
    assert f"after_seq={seen[-1].seq}" in str(ended.value.details())
    assert not any(e.HasField("tool_result") or e.HasField("error") for e in seen)  # its result is the peer's
    assert len(svc.registry.loop.model.requests) == 1


async def test_submit_run_answers_once_its_run_is_recorded_and_a_drain_hands_a_queued_one_over(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """A queued background run is recorded before SubmitRun answers: a crash after the answer does not lose it, and
    a drain hands it over with the running one."""
    tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=tools, runs={"background_max_concurrent": 1})
    running = await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="first"))
    queued = await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="second"))
    assert len(checkpoints(tmp_path)[0]) == 2  # both recorded as SubmitRun answered (the second waits for a slot)
    await asyncio.wait_for(tools["sleep"].running.wait(), 5)
    await svc.drain(grace=0.1)
    for submitted in (running, queued):
        assert svc.registry.get(submitted.run_id).lost is not None  # handed over, not ended here
    assert checkpoints(tmp_path)[0] == [("", "running"), ("", "running")]


async def test_a_durable_run_ends_with_its_closing_event_not_after_its_end_is_recorded(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """A chaos finding: the run's state (GetRun, the shared record) waited for the checkpoint of its end, so a
    crash in between left it RUNNING for good. Now the run has ended as its closing event is logged."""
    svc = await start_service(ECHO_THEN_ANSWER)
    store = svc.registry.durable.store
    recording, release = asyncio.Event(), asyncio.Event()
    end = store.end

    async def slow_end(run_id: str, state: str) -> None:
        recording.set()
        await release.wait()
        await end(run_id, state)

    store.end = slow_end
    events = await run_events(channel_to(svc), on_disconnect=pb.RunAgentRequest.CONTINUE)
    await asyncio.wait_for(recording.wait(), 5)
    got = await stub(channel_to(svc)).GetRun(pb.GetRunRequest(run_id=events[0].run_id))
    assert got.state == pb.Run.SUCCEEDED  # while its end is not recorded yet
    assert checkpoints(tmp_path)[0][0][1] == "running"
    release.set()
    await asyncio.wait_for(svc.registry.get(events[0].run_id).task, 5)
    assert checkpoints(tmp_path)[0][0][1] == "succeeded"


async def test_two_processes_on_one_data_dir_each_checkpoint_under_an_id_of_their_own(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    """The kept executor id is held by the first; the second takes another (and says so) rather than not start."""
    first, second = await start_service(ECHO_THEN_ANSWER), await start_service(ECHO_THEN_ANSWER)
    for svc in (first, second):
        events = await run_events(channel_to(svc), on_disconnect=pb.RunAgentRequest.CONTINUE)
        assert events[-1].HasField("final_response")
        await asyncio.wait_for(svc.registry.get(events[0].run_id).task, 5)  # its end is recorded after its last event
    runs, _ = checkpoints(tmp_path)
    assert len({owner for owner, _ in runs}) == 2 and {state for _, state in runs} == {"succeeded"}


async def test_durable_runs_are_refused_while_their_database_is_away_and_the_others_run(
    start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        away = f"postgresql://postgres@127.0.0.1:{probe.getsockname()[1]}/test"
    svc = await start_service(
        ECHO_THEN_ANSWER, records={"url": away, "timeout_s": 0.5}, audit={"key_file": audit_key_file(tmp_path)}
    )
    channel = channel_to(svc)
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await run_events(channel, on_disconnect=pb.RunAgentRequest.CONTINUE)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and "NOT_DURABLE" in str(refused.value.details())
    events = await run_events(channel)  # CANCEL: not durable, runs as ever
    assert events[-1].HasField("final_response")


async def test_a_durable_runs_stream_is_sent_only_what_the_shared_store_holds(
    start_service: Any, channel_to: Any, redis_ns: RedisNamespace
) -> None:
    """A chaos finding: a caller had been sent seqs the dying process had not shipped, and the process continuing
    the run from the store's last seq sent other events under them. Every event a durable run's stream sends is in
    Redis first."""
    import redis.asyncio as redis

    turns = [{"text": " ".join(f"w{i}" for i in range(40)), "tool_calls": [{"name": "echo", "input": {"text": "x"}}]}]
    svc = await start_service([*turns, {"text": "done"}], state={"url": redis_ns.url, "prefix": redis_ns.prefix})
    client = redis.Redis.from_url(redis_ns.url)
    try:
        call = stub(channel_to(svc)).RunAgent(
            pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE)
        )
        checked = 0
        async for event in call:
            last = await client.xrevrange(f"{redis_ns.prefix}run:{event.run_id}:events", count=1)
            assert last and int(last[0][0].split(b"-")[1]) >= event.seq, f"seq {event.seq} sent before it was stored"
            checked += 1
        assert checked > 10 and event.HasField("final_response")
    finally:
        await client.aclose()


async def test_a_durable_runs_end_is_recorded_once_the_shared_store_holds_its_closing_event(
    start_service: Any, channel_to: Any, redis_ns: RedisNamespace
) -> None:
    """A chaos finding (kill -9 on a fleet): a durable run's end was checkpointed before its closing events were in
    Redis, and the process was killed in between: no process continued the run (its checkpoint said it had ended)
    and its shared log never ended (its caller saw no end; GetRun said RUNNING until the lease ran out)."""
    import redis.asyncio as redis

    svc = await start_service(ECHO_THEN_ANSWER, state={"url": redis_ns.url, "prefix": redis_ns.prefix})
    store, checkpoints_ = svc.registry.store, svc.registry.durable.store
    client = redis.Redis.from_url(redis_ns.url)
    stored_at_end: list[int] = []
    end = checkpoints_.end

    async def checked_end(run_id: str, state: str) -> None:
        last = await client.xrevrange(f"{redis_ns.prefix}run:{run_id}:events", count=1)
        stored_at_end.append(int(last[0][0].split(b"-")[1]) if last else 0)
        await end(run_id, state)

    checkpoints_.end = checked_end
    try:
        run_id = (await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="go"))).run_id
        run = svc.registry.get(run_id)
        await cancel_and_wait(list(store._tasks), 5)  # nothing more is shipped for now
        await asyncio.wait_for(run.ended(), 5)  # its closing event is logged here, not in Redis
        await store.start()  # shipping again
        await asyncio.wait_for(run.task, 10)
        assert stored_at_end == [len(run.log)]
    finally:
        await client.aclose()


async def test_a_retry_with_the_key_of_a_run_that_ended_before_a_restart_attaches_to_it(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: after a restart the idempotency key of a durable run that had ended found nothing, and
    the retry ran the run again, every tool call with it (unsafe ones too)."""
    svc = await start_service(ECHO_THEN_ANSWER)
    kept = pb.RunAgentRequest.CONTINUE
    first = await run_events(channel_to(svc), message="once", on_disconnect=kept, idempotency_key="k-1")
    assert first[-1].HasField("final_response")
    await svc.drain(grace=0.1)
    again = await start_service(ECHO_THEN_ANSWER)
    retried = await run_events(channel_to(again), message="once", on_disconnect=kept, idempotency_key="k-1")
    assert retried == first  # the same run, replayed from its log
    assert again.registry.runs == {}  # and no run started
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await run_events(channel_to(again), message="another", on_disconnect=kept, idempotency_key="k-1")
    assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS and first[0].run_id in (other.value.details() or "")


async def test_an_after_turn_cancel_acknowledged_before_a_restart_stops_the_run_after_it(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: CancelRun AFTER_TURN answered RUNNING, the process was killed before the turn ended, and
    after the restart the run went on to its end (another model turn, another tool call)."""
    tools = all_tools()
    svc = await start_service(SLOW_TOOL, tools=tools)
    submitted = await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="go"))
    await asyncio.wait_for(tools["sleep"].running.wait(), 5)
    after_turn = pb.CancelRunRequest(run_id=submitted.run_id, mode=pb.CancelRunRequest.AFTER_TURN)
    assert (await stub(channel_to(svc)).CancelRun(after_turn)).state == pb.Run.RUNNING
    await svc.drain(grace=0.1)  # the run is handed over mid-turn, as a kill -9 leaves it
    again = await start_service(SLOW_TOOL, tools=all_tools())
    watched = await _watched(stub(channel_to(again)), submitted.run_id)
    assert watched[-1].error.code == "CANCELLED", watched[-1]
    assert watched[-1].error.message == "cancelled by CancelRun after the current turn"
    assert len(again.registry.loop.model.requests) == 0  # no turn after the one the cancel let end


async def test_an_after_turn_cancel_kept_across_a_takeover_lets_the_answer_in_progress_come(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: CancelRun AFTER_TURN during the model's answer, then the driver killed: the process that
    revived the run stopped it after the turn it replayed, and the answer the cancel had let come never came."""
    answer = {"text": " ".join(f"w{i}" for i in range(60))}
    turns = [{"text": "Echo.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]}, answer]
    paced = {"pacing": {"first_token_ms": 0, "token_interval_ms": 20}}
    svc = await start_service(turns, model=paced)
    run_id = (await stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="go"))).run_id
    run = svc.registry.get(run_id)
    for _ in range(250):  # into the answer's text: the echo call's result is recorded
        if sum(isinstance(e.event, ev.TextDelta) for e in run.log) > 3 and any(
            isinstance(e.event, ev.ToolResult) for e in run.log
        ):
            break
        await asyncio.sleep(0.02)
    after_turn = pb.CancelRunRequest(run_id=run_id, mode=pb.CancelRunRequest.AFTER_TURN)
    assert (await stub(channel_to(svc)).CancelRun(after_turn)).state == pb.Run.RUNNING
    await svc.drain(grace=0.1)  # handed over mid-answer, as a kill -9 leaves it
    again = await start_service(turns, model=paced)
    watched = await _watched(stub(channel_to(again)), run_id)
    assert watched[-1].HasField("final_response"), watched[-1]  # the answer came, as it would have without the kill
    assert watched[-1].final_response.text == answer["text"]


async def test_runs_queued_when_their_process_stopped_wait_for_a_slot_after_the_restart(
    start_service: Any, channel_to: Any
) -> None:
    """Outside findings (one node): after a kill -9 every SubmitRun that waited for a slot was continued at once on
    the restart (5 running under a cap of 2), each with a run_recovered though it never ran; and a drain ended every
    such run FAILED instead of handing it over."""
    svc = await start_service(SLOW_TOOL, runs={"background_max_concurrent": 1})
    api = stub(channel_to(svc))
    ids = [(await api.SubmitRun(pb.RunAgentRequest(message="go"))).run_id for _ in range(3)]
    running = svc.registry.get(ids[0])
    await asyncio.wait_for(running.reached(3), 5)  # the first one runs; the other two wait
    await svc.drain(grace=0.1)
    again = await start_service(SLOW_TOOL, runs={"background_max_concurrent": 1})
    continued = again.registry.get(ids[0])  # its cut-off sleep is OUTCOME_UNKNOWN: it ends soon after, SUCCEEDED
    await asyncio.wait_for(asyncio.shield(continued.ended()), 5)
    for _ in range(25):  # long enough for the restart to start both waiting runs, had it let them
        await asyncio.sleep(0.02)
    states = [again.registry.get(run_id).state for run_id in ids]
    assert states == [RunState.SUCCEEDED, RunState.RUNNING, RunState.QUEUED], states  # one at a time, in order
    assert not any(isinstance(e.event, ev.RunRecovered) for i in ids[1:] for e in again.registry.get(i).log)
    for run_id in ids[1:]:
        await stub(channel_to(again)).CancelRun(pb.CancelRunRequest(run_id=run_id))


async def test_a_key_finds_its_run_while_it_waits_in_the_one_nodes_store_queue(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding (one node, `durable.queue: store`): SubmitRuns sent again with the key of one that waited in
    the queue were all queued and all ran; the key now finds the waiting run (through the run log)."""
    svc = await start_service(SLOW_TOOL, runs={"background_max_concurrent": 1}, durable={"queue": "store"})
    api = stub(channel_to(svc))
    first = await api.SubmitRun(pb.RunAgentRequest(message="first"))  # takes the one slot
    keyed = pb.RunAgentRequest(message="second", idempotency_key="k-q")
    waiting = await api.SubmitRun(keyed)
    assert waiting.state == pb.Run.QUEUED
    async with asyncio.timeout(5):  # answered at once, not once the run is claimed (after the first's 30 s sleep)
        again = await api.SubmitRun(keyed)
    assert (again.run_id, again.state) == (waiting.run_id, pb.Run.QUEUED)
    with pytest.raises(grpc.aio.AioRpcError) as other:
        await api.SubmitRun(pb.RunAgentRequest(message="another", idempotency_key="k-q"))
    assert other.value.code() == grpc.StatusCode.ALREADY_EXISTS
    for run_id in (waiting.run_id, first.run_id):  # not left to the teardown, which would wait out the 30 s sleep
        with contextlib.suppress(grpc.aio.AioRpcError):  # one that ended meanwhile has nothing to cancel
            await api.CancelRun(pb.CancelRunRequest(run_id=run_id))
