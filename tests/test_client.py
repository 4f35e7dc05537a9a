"""The CLI client, run as a person would run it: a subprocess against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from typing import Any

import pytest

from conftest import cli
from service.rpc.client import main


async def test_cli_renders_a_run_for_a_person(start_service: Any) -> None:
    svc = await start_service()
    code, out, err = await cli(svc.port, "what is up?")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("run run_") and "scripted:test" in lines[0]
    assert "Echo first.Calling echo." in out  # thinking and text inline, as they arrive
    assert any(line.startswith('→ echo {"text":"hi"}') for line in lines)
    assert any(line.startswith("← echo ok in ") and "bytes" in line for line in lines)
    assert "The answer: " in out
    assert lines[-1].startswith("— 2 turn(s), 1 tool call(s)")


async def test_cli_json_prints_raw_events(start_service: Any) -> None:
    svc = await start_service()
    code, out, _ = await cli(svc.port, "--json", "hi")
    assert code == 0
    events = [json.loads(line) for line in out.splitlines()]
    assert "runStarted" in events[0] and "finalResponse" in events[-1]


async def test_cli_exits_non_zero_on_error(start_service: Any) -> None:
    svc = await start_service()
    code, _, err = await cli(svc.port, "--tools", "nope", "hi")
    assert code == 1
    assert err.startswith("INVALID_ARGUMENT: unknown tool(s): nope")


async def test_cli_stops_quietly_when_its_reader_leaves(start_service: Any) -> None:
    """`python -m service.client --json … | head -1`: the reader closes the pipe while events still come."""
    svc = await start_service(model={"pacing": {"first_token_ms": 0, "token_interval_ms": 20}})
    read_end, write_end = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.client", "--target", f"127.0.0.1:{svc.port}", "--json", "hi"),
        stdout=write_end,
        stderr=asyncio.subprocess.PIPE,
    )
    os.close(write_end)
    with os.fdopen(read_end, "rb") as reader:
        first = await asyncio.to_thread(reader.readline)
    assert b"runStarted" in first
    _, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 1
    assert err.decode() == ""


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "inf", "soon", "1e10"])
def test_cli_refuses_a_timeout_that_is_not_a_positive_number(timeout: str, capsys: pytest.CaptureFixture[str]) -> None:
    # before: 0 and -5 sent a call already past its deadline (DEADLINE_EXCEEDED at once), inf one with none, and
    # 1e10 one whose deadline grpc could not hold (DEADLINE_EXCEEDED at once, an outside finding)
    with pytest.raises(SystemExit) as exited:
        main(["--timeout", timeout, "hi"])
    assert exited.value.code == 2  # argparse's usage error, before any connection
    assert "argument --timeout:" in capsys.readouterr().err


async def test_cli_interrupted_says_so_and_exits_130(start_service: Any) -> None:
    """An outside finding: Ctrl-C during a run printed a traceback (CancelledError, then KeyboardInterrupt)."""
    svc = await start_service(model={"pacing": {"first_token_ms": 0, "token_interval_ms": 50}})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.client", "--target", f"127.0.0.1:{svc.port}", "--json", "hi"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    assert b"runStarted" in await asyncio.wait_for(proc.stdout.readline(), 30)  # the run is under way
    proc.send_signal(signal.SIGINT)
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert (proc.returncode, err.decode()) == (130, "interrupted\n")
