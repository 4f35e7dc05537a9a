"""Approvals of a durable run across `kill -9` (issue 17 with issue 18), with real server processes on one data_dir: a
run that waits for approval when its process dies waits again after the restart (same call id, the deadline of the
first request), and a decision sent to the restarted process applies: approved, the unsafe call runs exactly once,
never OUTCOME_UNKNOWN; denied, it never runs. A decision recorded before the kill is applied without asking again."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from test_durable_process import Fleet, start_run

from agent.v1 import agent_pb2 as pb
from conftest import stub
from fake_anthropic import FakeAnthropic

APPROVE, DENY = pb.ResolveApprovalRequest.APPROVE, pb.ResolveApprovalRequest.DENY


def fleet_asking_for(tool: str, tmp_path: Path, fake: FakeAnthropic) -> Fleet:
    fake.script_turn("Working.", tool_uses=[(tool, {"text": "a"})])
    fake.script_turn("done")
    return Fleet(tmp_path, fake, approvals={"tools": {tool: {"approval": "always"}}, "timeout_s": 120})


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        yield server


async def watch_until(port: int, run_id: str, stop: Any) -> list[pb.AgentEvent]:
    """The run's events from seq 1 until `stop(events so far)` holds, or to the run's end."""
    seen: list[pb.AgentEvent] = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        async for event in stub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30):
            seen.append(event)
            if stop(seen):
                break
    return seen


def asked(events: list[pb.AgentEvent]) -> bool:
    return events[-1].HasField("approval_required")


def asked_again(events: list[pb.AgentEvent]) -> bool:
    """Asked after the restart: the request the resumed run sends once its `run_recovered` is out."""
    return asked(events) and any(e.HasField("run_recovered") for e in events)


def of(kind: str, events: list[pb.AgentEvent]) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


async def killed_while_waiting(fleet: Fleet) -> tuple[str, pb.ApprovalRequired]:
    """A run on a node killed while its call waits for approval (the request committed before it was sent)."""
    proc, port = await fleet.start("node")
    run_id, stream = await start_run(port)
    (first,) = of("approval_required", await watch_until(port, run_id, asked))
    proc.kill()
    await proc.wait()
    await stream
    return run_id, first


async def decided_after_restart(fleet: Fleet, decision: Any) -> tuple[list[pb.AgentEvent], pb.ApprovalRequired]:
    run_id, first = await killed_while_waiting(fleet)
    _, port = await fleet.start("node")
    waiting = await watch_until(port, run_id, asked_again)
    again = of("approval_required", waiting)[-1]
    assert (again.call_id, again.deadline) == (first.call_id, first.deadline), "the same call, its first deadline"
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        api = stub(channel)
        await api.ResolveApproval(pb.ResolveApprovalRequest(run_id=run_id, call_id=first.call_id, decision=decision))
        events = [e async for e in api.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30)]
    assert [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)] == list(range(1, events[-1].seq + 1))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("run_recovered") == 1 and kinds.count("approval_decided") == 1, kinds
    assert events[-1].final_response.text == "done"
    assert len(fleet.fake.requests) == 2  # turn 1 before the kill, turn 2 after
    return events, first


@pytest.mark.parametrize(
    ("decision", "status", "runs"),
    [(APPROVE, pb.TOOL_STATUS_OK, 1), (DENY, pb.TOOL_STATUS_DENIED, 0)],
    ids=["approve", "deny"],
)
async def test_a_decision_sent_to_the_restarted_process_applies(
    tmp_path: Path, fake: FakeAnthropic, decision: Any, status: Any, runs: int
) -> None:
    """Approved: the unsafe call runs exactly once (not OUTCOME_UNKNOWN: it had not started when the node died).
    Denied: it never runs."""
    fleet = fleet_asking_for("effect", tmp_path, fake)
    try:
        events, first = await decided_after_restart(fleet, decision)
        (result,) = of("tool_result", events)
        assert (result.call_id, result.status) == (first.call_id, status)
        assert len(fleet.executions("effect")) == runs
    finally:
        await fleet.stop()


async def test_a_decision_recorded_before_the_kill_applies_without_asking_again(
    tmp_path: Path, fake: FakeAnthropic
) -> None:
    """Approved on the first process, the (safe) call started and was cut off by the kill: the restarted process runs
    it again under the recorded approval, with no new `approval_required`."""
    fleet = fleet_asking_for("effect_safe", tmp_path, fake)
    try:
        fleet.hold()
        proc, port = await fleet.start("node")
        run_id, stream = await start_run(port)
        (first,) = of("approval_required", await watch_until(port, run_id, asked))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            request = pb.ResolveApprovalRequest(run_id=run_id, call_id=first.call_id, decision=APPROVE)
            await stub(channel).ResolveApproval(request)
        async with asyncio.timeout(15):
            while not fleet.executions("effect_safe"):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.02)
        proc.kill()
        await proc.wait()
        await stream
        fleet.release()
        _, port = await fleet.start("node")
        events = await watch_until(port, run_id, lambda seen: False)
        recovered = next(i for i, e in enumerate(events) if e.HasField("run_recovered"))
        assert not of("approval_required", events[recovered:]), "a recorded decision is not asked for again"
        assert [r.status for r in of("tool_result", events)] == [pb.TOOL_STATUS_OK]
        assert events[-1].final_response.text == "done"
        runs = fleet.executions("effect_safe")
        assert len(runs) == 2 and runs[0] == runs[1]  # cut off, then again with the same idempotency key
    finally:
        await fleet.stop()
