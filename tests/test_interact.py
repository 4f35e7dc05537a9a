"""Interactive runs against a real server (issue 17), through the unary RPCs: approvals (approve, deny, edit, timeout,
two-party control, a rule, a caller's rights), steering seen by the model, stopping one of two parallel calls."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from typing import Any

import grpc
import pytest
from google.protobuf import json_format, struct_pb2
from test_gc_hygiene import cyclic_frames_of_ours

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service.records.audit import DEFAULT_FILE as AUDIT_FILE

ECHO = [
    {"text": "Echo it.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]},
    {"text": "Done: {results}"},
]
TWO_SLEEPS = [
    {
        "text": "Two at once.",
        "tool_calls": [{"name": "sleep", "input": {"seconds": 30}}, {"name": "echo", "input": {"text": "quick"}}],
    },
    {"text": "Done: {results}"},
]
ALWAYS = {"approvals": {"tools": {"echo": {"approval": "always"}}}}


def struct(value: dict[str, Any]) -> struct_pb2.Struct:
    out = struct_pb2.Struct()
    out.update(value)
    return out


async def until(call: Any, kind: str, seen: list[pb.AgentEvent]) -> pb.AgentEvent:
    async for event in call:
        seen.append(event)
        if event.WhichOneof("event") == kind:
            return event
    raise AssertionError(f"the stream ended before {kind}: {[e.WhichOneof('event') for e in seen]}")


async def rest(call: Any, seen: list[pb.AgentEvent]) -> list[pb.AgentEvent]:
    seen.extend([e async for e in call])
    return seen


def of(kind: str, events: list[pb.AgentEvent]) -> list[Any]:
    return [getattr(e, kind) for e in events if e.WhichOneof("event") == kind]


def resolve(api: Any, run_id: str, call_id: str, approve: bool, **kw: Any) -> Any:
    verdict = pb.ResolveApprovalRequest.APPROVE if approve else pb.ResolveApprovalRequest.DENY
    return api.ResolveApproval(pb.ResolveApprovalRequest(run_id=run_id, call_id=call_id, decision=verdict, **kw))


async def test_an_approved_call_runs_after_its_decision(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(ECHO, **ALWAYS)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    assert asked.name == "echo" and json_format.MessageToDict(asked.input) == {"text": "hi", "times": 1.0}
    assert "every call" in asked.reason and asked.approvers == ["anonymous"]
    assert not of("tool_result", seen)  # it waits: the tool has not run
    await resolve(api, seen[0].run_id, asked.call_id, True, reason="fine")
    events = await rest(call, seen)
    (decided,) = of("approval_decided", events)
    assert decided.approved and decided.decided_by == "anonymous" and decided.reason == "fine"
    (result,) = of("tool_result", events)
    assert result.status == pb.TOOL_STATUS_OK
    assert of("final_response", events)
    # a second decision is named as such
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await resolve(api, seen[0].run_id, asked.call_id, True)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_denied_call_never_runs_and_the_model_reads_why(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(ECHO, **ALWAYS)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    with pytest.raises(grpc.aio.AioRpcError) as err:  # refused, not cut short without a word (an outside finding)
        await resolve(api, seen[0].run_id, asked.call_id, False, reason="r" * 2001)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "reason is limited to 2000 characters, got 2001"
    await resolve(api, seen[0].run_id, asked.call_id, False, reason="not today")
    events = await rest(call, seen)
    (result,) = of("tool_result", events)
    assert result.status == pb.TOOL_STATUS_DENIED and result.error == "denied by anonymous: not today"
    last = svc.model.requests[-1].messages[-1]["content"][0]
    assert last["is_error"] and last["content"] == "denied by anonymous: not today"
    # the request and the decision are in the audit log, each with the identity that made it, then the call
    await svc.executor.audit.flush()
    with sqlite3.connect(svc.config.data_dir / AUDIT_FILE) as conn:
        rows = conn.execute("SELECT status, metadata FROM audit WHERE tool = 'echo' ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["approval_required", "denied", "denied"]
    asked, decided = json.loads(rows[0][1]), json.loads(rows[1][1])
    assert asked["asked_by"] == "anonymous" and "every call" in asked["approval_reason"]
    assert decided["decided_by"] == "anonymous" and decided["approval_reason"] == "not today"


async def test_cancel_after_the_turn_denies_a_call_waiting_for_approval(start_service: Any, channel_to: Any) -> None:
    """An outside finding: CancelRun AFTER_TURN while the turn's call waited for a person left the run waiting until
    the approval's deadline (then the call's deadline); the waiting call is now denied and the run stops."""
    svc = await start_service(ECHO, approvals={"tools": {"echo": {"approval": "always"}}, "timeout_s": 60})
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    await api.CancelRun(pb.CancelRunRequest(run_id=seen[0].run_id, mode=pb.CancelRunRequest.AFTER_TURN))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        async with asyncio.timeout(5):  # not the approval's 60 s
            async for event in call:
                seen.append(event)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    events = seen
    (decided,) = of("approval_decided", events)
    assert not decided.approved and decided.decided_by == "CancelRun" and decided.call_id == asked.call_id
    (result,) = of("tool_result", events)
    assert result.status == pb.TOOL_STATUS_DENIED and "the run stops after this turn" in result.error
    assert of("error", events)[-1].code == "CANCELLED"


async def test_an_edited_input_is_validated_again_and_runs(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(ECHO, **ALWAYS)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    run_id = seen[0].run_id
    with pytest.raises(grpc.aio.AioRpcError) as err:  # times ≤ 3: refused, and the call still waits
        await resolve(api, run_id, asked.call_id, True, edited_input=struct({"text": "bye", "times": 9}))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "still waits" in err.value.details()
    await resolve(api, run_id, asked.call_id, True, edited_input=struct({"text": "bye", "times": 2}))
    events = await rest(call, seen)
    (decided,) = of("approval_decided", events)
    assert json_format.MessageToDict(decided.edited_input) == {"text": "bye", "times": 2.0}
    (result,) = of("tool_result", events)
    assert json_format.MessageToDict(result.data) == {"echo": "byebye"}


async def test_nobody_deciding_in_time_denies_the_call(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(ECHO, approvals={"tools": {"echo": {"approval": "always"}}, "timeout_s": 0.2})
    events = [e async for e in stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))]
    (decided,) = of("approval_decided", events)
    assert not decided.approved and decided.decided_by == "timeout"
    (result,) = of("tool_result", events)
    assert result.status == pb.TOOL_STATUS_DENIED and "nobody decided within 0.2 s" in result.error
    assert of("final_response", events)  # the run goes on


def token_callers(**approvals: Any) -> dict[str, Any]:
    callers = [
        {"name": name, "token_sha256": [hashlib.sha256(f"token-{name}".encode()).hexdigest()]}
        for name in ("alice", "bob", "eve")
    ]
    return {"auth": {"required": True, "callers": callers}, "approvals": approvals}


def as_caller(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer token-{name}")]


async def test_two_party_control_refuses_the_callers_own_approval(start_service: Any, channel_to: Any) -> None:
    config = token_callers(tools={"echo": {"approval": "always"}}, approvers=["bob"], two_party=True)
    svc = await start_service(ECHO, **config)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]), metadata=as_caller("alice"))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    assert list(asked.approvers) == ["bob"]
    run_id = seen[0].run_id
    request = pb.ResolveApprovalRequest(
        run_id=run_id, call_id=asked.call_id, decision=pb.ResolveApprovalRequest.APPROVE
    )
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.ResolveApproval(request, metadata=as_caller("alice"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED and "two-party" in err.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as err:  # a third caller learns nothing of the run
        await api.ResolveApproval(request, metadata=as_caller("eve"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    await api.ResolveApproval(request, metadata=as_caller("bob"))
    events = await rest(call, seen)
    assert of("approval_decided", events)[0].decided_by == "bob"
    assert of("tool_result", events)[0].status == pb.TOOL_STATUS_OK


async def test_a_rule_on_the_input_asks_only_for_the_calls_it_matches(start_service: Any, channel_to: Any) -> None:
    turns = [
        {
            "text": "Two echoes.",
            "tool_calls": [
                {"name": "echo", "input": {"text": "once"}},
                {"name": "echo", "input": {"text": "thrice", "times": 3}},
            ],
        },
        {"text": "Done: {results}"},
    ]
    rule = {"approval": "when", "when": {"any": [{"pointer": "/times", "op": "gt", "value": 2}]}}
    svc = await start_service(turns, approvals={"tools": {"echo": rule}, "timeout_s": 0.2})
    events = [e async for e in stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))]
    (asked,) = of("approval_required", events)
    assert "/times gt 2" in asked.reason
    statuses = {r.call_id: r.status for r in of("tool_result", events)}
    assert statuses[asked.call_id] == pb.TOOL_STATUS_DENIED
    assert sorted(statuses.values()) == [pb.TOOL_STATUS_OK, pb.TOOL_STATUS_DENIED]


async def test_steering_reaches_the_next_model_request(start_service: Any, channel_to: Any) -> None:
    turns = [
        {"text": "Sleeping.", "tool_calls": [{"name": "sleep", "input": {"seconds": 0.3}}]},
        {"text": "Done: {results}"},
    ]
    svc = await start_service(turns)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["sleep"]))
    seen: list[pb.AgentEvent] = []
    await until(call, "tool_call_ready", seen)
    await api.SendInput(pb.SendInputRequest(run_id=seen[0].run_id, text="use last quarter", when=pb.AFTER_TURN))
    events = await rest(call, seen)
    (received,) = [e for e in events if e.WhichOneof("event") == "input_received"]
    assert received.input_received.text == "use last quarter" and received.input_received.when == pb.AFTER_TURN
    second = svc.model.requests[-1].messages[-1]
    assert second["role"] == "user"
    assert second["content"][0]["type"] == "tool_result"
    assert second["content"][-1] == {"type": "text", "text": "use last quarter"}
    assert "use last quarter" not in str(svc.model.requests[0].messages)


async def test_steering_after_the_answer_gets_answered_too(start_service: Any, channel_to: Any) -> None:
    turns = [{"text": "First answer."}, {"text": "Corrected answer."}]
    svc = await start_service(turns, model={"pacing": {"first_token_ms": 300, "token_interval_ms": 0}})
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo"]))
    seen: list[pb.AgentEvent] = []
    await until(call, "run_started", seen)
    await api.SendInput(pb.SendInputRequest(run_id=seen[0].run_id, text="no, this quarter"))
    events = await rest(call, seen)
    (final,) = of("final_response", events)
    assert final.text == "Corrected answer." and final.turns == 2
    assert svc.model.requests[-1].messages[-1] == {
        "role": "user",
        "content": [{"type": "text", "text": "no, this quarter"}],
    }


async def test_cancelling_one_of_two_parallel_calls(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(TWO_SLEEPS)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["sleep", "echo"]))
    seen: list[pb.AgentEvent] = []
    sleeping = svc.tools["sleep"]
    ready = await until(call, "tool_call_ready", seen)
    while ready.tool_call_ready.name != "sleep":
        ready = await until(call, "tool_call_ready", seen)
    sleep_id = ready.tool_call_ready.call_id
    await asyncio.wait_for(sleeping.running.wait(), 5)
    await api.CancelToolCall(pb.CancelToolCallRequest(run_id=seen[0].run_id, call_id=sleep_id))
    events = await rest(call, seen)
    results = {r.name: r for r in of("tool_result", events)}
    assert results["sleep"].status == pb.TOOL_STATUS_CANCELLED and "CancelToolCall" in results["sleep"].error
    assert results["echo"].status == pb.TOOL_STATUS_OK
    assert of("final_response", events)  # the run went on
    assert sleeping.cancelled == 1 and sleeping.finished == 0  # really stopped, not left running
    blocks = svc.model.requests[-1].messages[-1]["content"]
    assert [b.get("is_error", False) for b in blocks] == [True, False]
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await api.CancelToolCall(pb.CancelToolCallRequest(run_id=seen[0].run_id, call_id=sleep_id))
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_a_call_waiting_for_approval_holds_up_no_other_call(start_service: Any, channel_to: Any) -> None:
    turns = [
        {
            "text": "Both.",
            "tool_calls": [{"name": "echo", "input": {"text": "held"}}, {"name": "sleep", "input": {"seconds": 0.05}}],
        },
        {"text": "Done: {results}"},
    ]
    svc = await start_service(turns, **ALWAYS)
    api = stub(channel_to(svc))
    call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo", "sleep"]))
    seen: list[pb.AgentEvent] = []
    asked = (await until(call, "approval_required", seen)).approval_required
    slept = await until(call, "tool_result", seen)  # the other call ends while this one waits
    assert slept.tool_result.name == "sleep" and slept.tool_result.status == pb.TOOL_STATUS_OK
    await resolve(api, seen[0].run_id, asked.call_id, True)
    events = await rest(call, seen)
    assert of("tool_result", events)[-1].name == "echo" and of("final_response", events)


async def test_a_callers_rights_can_require_approval(start_service: Any, channel_to: Any) -> None:
    config = token_callers(timeout_s=0.2)
    config["auth"]["callers"][0]["require_approval"] = ["echo"]  # alice's echo calls wait; bob's do not
    svc = await start_service(ECHO, **config)
    api = stub(channel_to(svc))
    request = pb.RunAgentRequest(message="go", tools=["echo"])
    alice = [e async for e in api.RunAgent(request, metadata=as_caller("alice"))]
    bob = [e async for e in api.RunAgent(request, metadata=as_caller("bob"))]
    (asked,) = of("approval_required", alice)
    assert asked.reason == "caller alice needs approval for echo" and list(asked.approvers) == ["alice"]
    assert of("tool_result", alice)[0].status == pb.TOOL_STATUS_DENIED
    assert not of("approval_required", bob) and of("tool_result", bob)[0].status == pb.TOOL_STATUS_OK


async def test_a_cancelled_call_and_a_decided_approval_leave_no_cycles(start_service: Any, channel_to: Any) -> None:
    turns = [
        {
            "text": "Both.",
            "tool_calls": [{"name": "echo", "input": {"text": "x"}}, {"name": "sleep", "input": {"seconds": 30}}],
        },
        {"text": "Done."},
    ]
    svc = await start_service(turns, **ALWAYS)
    api = stub(channel_to(svc))

    async def body() -> None:
        call = api.RunAgent(pb.RunAgentRequest(message="go", tools=["echo", "sleep"]))
        seen: list[pb.AgentEvent] = []
        asked = (await until(call, "approval_required", seen)).approval_required
        await resolve(api, seen[0].run_id, asked.call_id, False)
        await asyncio.wait_for(svc.tools["sleep"].running.wait(), 5)
        while not [e for e in seen if e.WhichOneof("event") == "tool_call_ready" and e.tool_call_ready.name == "sleep"]:
            await until(call, "tool_call_ready", seen)
        ready = [e.tool_call_ready for e in seen if e.WhichOneof("event") == "tool_call_ready"]
        sleep_id = next(r.call_id for r in ready if r.name == "sleep")
        await api.CancelToolCall(pb.CancelToolCallRequest(run_id=seen[0].run_id, call_id=sleep_id))
        assert of("final_response", await rest(call, seen))

    assert await cyclic_frames_of_ours(body) == []
