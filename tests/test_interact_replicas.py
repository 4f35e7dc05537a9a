"""Approvals and steering across replicas: two real server processes (`python -m service`) on one Redis prefix. A run
submitted to A waits for an approval that B's ResolveApproval gives; B's refusals keep their status."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from backends import RedisNamespace
from test_shared_runs_process import launch

from agent.v1 import agent_pb2 as pb
from conftest import stub

TURNS = [
    {"text": "Searching.", "tool_calls": [{"name": "search_documents", "input": {"query": "late carrier"}}]},
    {"text": "Found: {results}"},
]


async def replica(tmp_path: Path, name: str, ns: RedisNamespace) -> tuple[Any, int]:
    """A server process whose search_documents calls wait for approval; returns it and its port."""
    scenario = tmp_path / "scenario.yaml"
    scenario.write_text(yaml.safe_dump({"name": "approve", "turns": TURNS}))
    settings = {
        "listen": "127.0.0.1:0",
        "metrics_listen": "127.0.0.1:0",
        "shutdown_grace_s": 5,
        "model": {"scenario": str(scenario), "pacing": {"first_token_ms": 0, "token_interval_ms": 0}},
        "state": {"url": ns.url, "prefix": ns.prefix},
        "approvals": {"tools": {"search_documents": {"approval": "always"}}},
    }
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(settings))
    return await launch(config, tmp_path / name)


@pytest.fixture
async def two_replicas(tmp_path: Path, redis_ns: RedisNamespace) -> AsyncIterator[tuple[int, int]]:
    started = [await replica(tmp_path, name, redis_ns) for name in ("a", "b")]
    yield started[0][1], started[1][1]
    for proc, _ in started:
        proc.send_signal(signal.SIGTERM)
    for proc, _ in started:
        await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0


async def test_a_decision_and_input_sent_to_another_replica_reach_the_run(two_replicas: tuple[int, int]) -> None:
    port_a, port_b = two_replicas
    async with (
        grpc.aio.insecure_channel(f"127.0.0.1:{port_a}") as channel_a,
        grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel_b,
    ):
        on_a, on_b = stub(channel_a), stub(channel_b)
        run_id = (await on_a.SubmitRun(pb.RunAgentRequest(message="late?", tools=["search_documents"]))).run_id
        seen: list[pb.AgentEvent] = []
        async for event in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id)):
            seen.append(event)
            if event.WhichOneof("event") == "approval_required":
                break
        call_id = seen[-1].approval_required.call_id
        # a refusal on the driving replica comes back with its status
        wrong = pb.ResolveApprovalRequest(run_id=run_id, call_id="toolu_nope", decision=pb.ResolveApprovalRequest.DENY)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await on_b.ResolveApproval(wrong)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "toolu_nope" in err.value.details()
        await on_b.SendInput(pb.SendInputRequest(run_id=run_id, text="only this quarter"))
        approve = pb.ResolveApprovalRequest(run_id=run_id, call_id=call_id, decision=pb.ResolveApprovalRequest.APPROVE)
        await on_b.ResolveApproval(approve)
        events = [e async for e in on_b.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=seen[-1].seq))]
        kinds = [e.WhichOneof("event") for e in events]
        assert "input_received" in kinds and kinds[-1] == "final_response"
        (decided,) = [e.approval_decided for e in events if e.WhichOneof("event") == "approval_decided"]
        assert decided.approved and decided.decided_by == "anonymous"
        (result,) = [e.tool_result for e in events if e.WhichOneof("event") == "tool_result"]
        assert result.status == pb.TOOL_STATUS_OK
        with pytest.raises(grpc.aio.AioRpcError) as err:  # the run ended: nothing more to decide
            await on_b.ResolveApproval(approve)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
