"""Interact, the bidirectional stream, against a real server: it starts or attaches to a run and carries decisions,
steering and tool cancels; nonsense gets an error event with seq 0, a malformed message INVALID_ARGUMENT; a fast
client is held to a bound; leaving keeps on_disconnect. And the CLI's `-i`, as a person uses it."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import grpc
import pytest
from test_interact import ALWAYS, ECHO, TWO_SLEEPS, of

from agent.v1 import agent_pb2 as pb
from conftest import stub


async def read_until(call: Any, kind: str, seen: list[pb.AgentEvent]) -> pb.AgentEvent:
    while True:
        event = await call.read()
        assert event is not grpc.aio.EOF, f"the stream ended before {kind}"
        seen.append(event)
        if event.WhichOneof("event") == kind:
            return event


async def read_rest(call: Any, seen: list[pb.AgentEvent]) -> list[pb.AgentEvent]:
    while (event := await call.read()) is not grpc.aio.EOF:
        seen.append(event)
    return seen


def start(**request: Any) -> pb.ClientMessage:
    return pb.ClientMessage(start=pb.RunAgentRequest(**request))


async def test_interact_starts_a_run_and_carries_its_decisions(start_service: Any, channel_to: Any) -> None:
    turns = [  # a second turn that takes a while: the run is still going when the second decision comes
        *ECHO[:1],
        {"text": "Wait.", "tool_calls": [{"name": "sleep", "input": {"seconds": 0.5}}]},
        {"text": "Done."},
    ]
    svc = await start_service(turns, **ALWAYS)
    call = stub(channel_to(svc)).Interact()
    await call.write(start(message="go", tools=["echo", "sleep"]))
    seen: list[pb.AgentEvent] = []
    asked = (await read_until(call, "approval_required", seen)).approval_required
    # nonsense now: an error event with seq 0 naming it, and the run goes on
    await call.write(pb.ClientMessage(approve=pb.Decision(call_id="toolu_nope")))
    refused = await read_until(call, "error", seen)
    assert refused.seq == 0 and refused.error.code == "FAILED_PRECONDITION"
    assert "approve refused: no call 'toolu_nope' waits for approval" in refused.error.message
    await call.write(pb.ClientMessage(approve=pb.Decision(call_id=asked.call_id, reason="ok")))
    await call.write(pb.ClientMessage(deny=pb.Decision(call_id=asked.call_id)))  # a second decision
    await call.done_writing()
    events = await read_rest(call, seen)
    assert await call.code() == grpc.StatusCode.OK
    errors = [e.error for e in events if e.WhichOneof("event") == "error"]
    assert len(errors) == 2 and "already decided (by anonymous)" in errors[1].message
    assert of("tool_result", events)[0].status == pb.TOOL_STATUS_OK
    assert of("final_response", events)
    logged = [e.seq for e in events if e.seq]
    assert logged == list(range(1, len(logged) + 1))  # the refusals are not in the run's log


async def test_a_malformed_message_ends_the_call_with_invalid_argument(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(TWO_SLEEPS)
    api = stub(channel_to(svc))
    call = api.Interact()
    await call.write(pb.ClientMessage(send_input=pb.SendInputRequest(text="no start first")))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_rest(call, [])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "first message" in err.value.details()
    call = api.Interact()
    await call.write(start(message="go", tools=["sleep", "echo"], on_disconnect=pb.RunAgentRequest.CONTINUE))
    seen: list[pb.AgentEvent] = []
    await read_until(call, "run_started", seen)
    await call.write(pb.ClientMessage())
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_rest(call, seen)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "empty ClientMessage" in err.value.details()
    run = svc.registry.get(seen[0].run_id)
    assert not run.finished  # CONTINUE: the run outlives the call
    await api.CancelRun(pb.CancelRunRequest(run_id=run.id, mode=pb.CancelRunRequest.IMMEDIATE))


async def test_attach_to_a_running_run_and_stop_one_call(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(TWO_SLEEPS)
    api = stub(channel_to(svc))
    run_id = (await api.SubmitRun(pb.RunAgentRequest(message="go", tools=["sleep", "echo"]))).run_id
    await asyncio.wait_for(svc.tools["sleep"].running.wait(), 5)
    call = api.Interact()
    await call.write(pb.ClientMessage(attach=pb.AttachRequest(run_id=run_id)))
    seen: list[pb.AgentEvent] = []
    ready = await read_until(call, "tool_call_ready", seen)
    while ready.tool_call_ready.name != "sleep":
        ready = await read_until(call, "tool_call_ready", seen)
    assert seen[0].seq == 1  # from the start of the log
    await call.write(pb.ClientMessage(cancel_tool=pb.CancelToolCallRequest(call_id=ready.tool_call_ready.call_id)))
    events = await read_rest(call, seen)
    results = {r.name: r.status for r in of("tool_result", events)}
    assert results == {"sleep": pb.TOOL_STATUS_CANCELLED, "echo": pb.TOOL_STATUS_OK}
    assert of("final_response", events)


async def test_a_client_sending_faster_than_the_run_reads_is_bounded(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(TWO_SLEEPS)
    call = stub(channel_to(svc)).Interact()
    await call.write(start(message="go", tools=["sleep", "echo"]))
    seen: list[pb.AgentEvent] = []
    ready = await read_until(call, "tool_call_ready", seen)
    while ready.tool_call_ready.name != "sleep":
        ready = await read_until(call, "tool_call_ready", seen)
    sent = 200

    async def send() -> None:
        for i in range(sent):
            await call.write(pb.ClientMessage(send_input=pb.SendInputRequest(text=f"note {i}")))
        await call.write(pb.ClientMessage(cancel_tool=pb.CancelToolCallRequest(call_id=ready.tool_call_ready.call_id)))
        await call.done_writing()

    writer = asyncio.create_task(send())
    events = await read_rest(call, seen)
    await writer
    received = of("input_received", events)
    refused = [e.error for e in events if e.WhichOneof("event") == "error" and e.seq == 0]
    assert len(received) == svc.registry.runs[seen[0].run_id].control.inbox.max_inputs == 16
    assert len(refused) == sent - 16 and {r.code for r in refused} == {"RESOURCE_EXHAUSTED"}
    assert [r.text for r in received] == [f"note {i}" for i in range(16)]
    texts = [b["text"] for b in svc.model.requests[-1].messages[-1]["content"] if b["type"] == "text"]
    assert texts == [f"note {i}" for i in range(16)]  # all of them, in order, in the next request
    assert of("final_response", events)


async def test_the_cli_asks_the_person_and_takes_a_correction(start_service: Any) -> None:
    turns = [
        {"text": "Echo it.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]},
        {"text": "Now wait.", "tool_calls": [{"name": "sleep", "input": {"seconds": 0.5}}]},
        {"text": "Done: {results}"},
    ]
    svc = await start_service(turns, **ALWAYS)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.client", "--target", f"127.0.0.1:{svc.port}", "-i", "--tools", "echo,sleep", "go"),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    shown = b""

    async def until_shown(text: bytes) -> None:
        nonlocal shown
        while text not in shown:
            chunk = await asyncio.wait_for(proc.stdout.read(1024), 30)  # type: ignore[union-attr]
            assert chunk, f"the client ended before {text!r}: {shown.decode()}"
            shown += chunk

    await until_shown(b"approve? ")
    proc.stdin.write(b"e not json\n")  # the person mistypes: asked again, nothing sent
    await until_shown(b"not JSON")
    proc.stdin.write(b'e {"text": "bye"}\n')
    await until_shown("→ sleep".encode())
    proc.stdin.write(b"use last quarter\n")
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    text = (shown + out).decode()
    assert proc.returncode == 0, err.decode()
    assert "? echo" in text and "needs approval" in text
    assert "✓ approved by anonymous: edited" in text and "← echo ok" in text
    assert "» input from anonymous: use last quarter" in text
    assert {"type": "text", "text": "use last quarter"} in svc.model.requests[-1].messages[-1]["content"]


async def test_leaving_an_interact_stream_keeps_on_disconnect(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(ECHO, **ALWAYS)
    call = stub(channel_to(svc)).Interact()
    await call.write(start(message="go", tools=["echo"]))  # on_disconnect CANCEL, the default
    seen: list[pb.AgentEvent] = []
    await read_until(call, "approval_required", seen)
    call.cancel()
    run = svc.registry.get(seen[0].run_id)
    await asyncio.wait_for(run.ended(), 5)
    assert run.outcome is not None and run.outcome.code == "CANCELLED"  # type: ignore[union-attr]


async def test_a_message_naming_another_run_is_refused_not_applied_to_this_one(
    start_service: Any, channel_to: Any
) -> None:
    """An outside finding: send_input and cancel_run with the run_id of another run acted on the stream's run."""
    svc = await start_service(TWO_SLEEPS)
    api = stub(channel_to(svc))
    other = (await api.SubmitRun(pb.RunAgentRequest(message="other", tools=["sleep", "echo"]))).run_id
    call = api.Interact()
    await call.write(start(message="go", tools=["sleep", "echo"]))
    seen: list[pb.AgentEvent] = []
    await read_until(call, "run_started", seen)
    this = seen[0].run_id
    for message in (
        pb.ClientMessage(send_input=pb.SendInputRequest(run_id=other, text="for the other run")),
        pb.ClientMessage(cancel_run=pb.CancelRunRequest(run_id=other)),
        pb.ClientMessage(cancel_tool=pb.CancelToolCallRequest(run_id="run_nope", call_id="toolu_x")),
    ):
        await call.write(message)
        refused = await read_until(call, "error", seen)
        assert refused.seq == 0 and refused.error.code == "INVALID_ARGUMENT", refused
        assert "is not this stream's run" in refused.error.message
    # naming its own run is fine: this cancel applies
    await call.write(pb.ClientMessage(cancel_run=pb.CancelRunRequest(run_id=this)))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await read_rest(call, seen)
    assert err.value.code() == grpc.StatusCode.CANCELLED
    assert not of("input_received", seen) and of("error", seen)[-1].code == "CANCELLED"
    assert not svc.registry.get(other).finished  # the other run was not touched
    await api.CancelRun(pb.CancelRunRequest(run_id=other))
