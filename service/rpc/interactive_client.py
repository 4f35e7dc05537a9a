"""`python -m service.client -i "question"`: the run over `Interact`, with a person in the loop. When a call needs
approval the client asks; the person answers `y` (approve), `n REASON` (deny) or `e JSON` (approve with this input
instead). Any other line, typed at any time, goes to the model as a correction (`send_input`, ASAP)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import threading
from collections import deque
from typing import TextIO

import grpc
from google.protobuf import struct_pb2

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from service.rpc.client import Renderer

PROMPT = "  approve? y · n REASON · e JSON (edited input) > "


def answer(line: str, call_id: str) -> pb.ClientMessage | str:
    """The person's answer to the approval of `call_id` as a message, or what is wrong with it."""
    word, _, rest = line.strip().partition(" ")
    if word.lower() in ("y", "yes"):
        return pb.ClientMessage(approve=pb.Decision(call_id=call_id, reason=rest))
    if word.lower() in ("n", "no"):
        return pb.ClientMessage(deny=pb.Decision(call_id=call_id, reason=rest or "denied at the console"))
    if word.lower() in ("e", "edit"):
        try:
            edited = json.loads(rest)
        except json.JSONDecodeError as exc:
            return f"not JSON: {exc}"
        if not isinstance(edited, dict):
            return "the edited input is a JSON object"
        value = struct_pb2.Struct()
        value.update(edited)
        return pb.ClientMessage(approve=pb.Decision(call_id=call_id, edited_input=value, reason="edited"))
    return "answer y, n REASON or e JSON"


async def converse(
    args: argparse.Namespace,
    request: pb.RunAgentRequest,
    channel: grpc.aio.Channel,
    metadata: tuple[tuple[str, str], ...] | None,
    out: TextIO,
    lines: asyncio.Queue[str] | None = None,
) -> int:
    """Run `request` over Interact, rendering its events; `lines` (default: stdin's) are the person's."""
    renderer = Renderer(out, color=not args.no_color and out.isatty())
    typed = lines if lines is not None else _stdin_lines()
    waiting: deque[str] = deque()  # call ids waiting for the person's answer, oldest first
    async with channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).Interact(timeout=args.timeout, metadata=metadata)
        await call.write(pb.ClientMessage(start=request))
        person = asyncio.create_task(_person(call, typed, waiting, out))
        prompted = False
        try:
            while (event := await call.read()) is not grpc.aio.EOF:
                if prompted:
                    out.write("\n")  # the prompt was left open on its line
                    prompted = False
                if args.json:
                    out.write(json.dumps({"seq": event.seq, "event": event.WhichOneof("event")}) + "\n")
                renderer.event(event)
                kind = event.WhichOneof("event")
                if kind == "approval_required":
                    waiting.append(event.approval_required.call_id)
                    out.write(PROMPT)
                    prompted = True
                elif kind == "approval_decided" and event.approval_decided.call_id in waiting:
                    waiting.remove(event.approval_decided.call_id)
                out.flush()
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
        finally:
            person.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await person
    return 0


async def _person(call: grpc.aio.StreamStreamCall, typed: asyncio.Queue[str], waiting: deque[str], out: TextIO) -> None:
    """Each line the person types: the answer to the oldest approval waiting, else a correction for the model."""
    while True:
        line = await typed.get()
        if not line.strip():
            continue
        if waiting:
            message = answer(line, waiting[0])
            if isinstance(message, str):
                out.write(f"  {message}\n{PROMPT}")
                out.flush()
                continue
        else:
            message = pb.ClientMessage(send_input=pb.SendInputRequest(text=line.strip()))
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.InvalidStateError):
            await call.write(message)


def _stdin_lines() -> asyncio.Queue[str]:
    """Lines of stdin as they are typed, read on a daemon thread: a console's stdin cannot be awaited portably, and
    a thread of the loop's executor would keep the process alive in `readline` after the run ended."""
    lines: asyncio.Queue[str] = asyncio.Queue()  # a person's typing: a few lines at most
    loop = asyncio.get_running_loop()

    def read() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(lines.put_nowait, line)

    threading.Thread(target=read, name="stdin", daemon=True).start()
    return lines
