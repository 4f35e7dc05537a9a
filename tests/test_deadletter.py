"""Dead letters through a real server: a call that finally fails is stored, survives a restart of the service on
the same data_dir, and the CLI lists and shows it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from conftest import run_events
from fake_tools import policy_tools
from service.records.deadletter import DeadLetter, DeadLetterStore, capture, main

FAIL_THEN_ANSWER = [
    {"text": "Calling flaky.", "tool_calls": [{"name": "flaky", "input": {"text": "boom"}}]},
    {"text": "The answer: {results}"},
]


async def test_dead_letters_survive_a_restart_and_the_cli_lists_them(
    start_service: Any, channel_to: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    overrides = {"flaky": {"retry": {"attempts": 2, "initial_backoff_s": 0.001}}}
    svc = await start_service(FAIL_THEN_ANSWER, tools=policy_tools(failures=99), policies=overrides)
    events = await run_events(channel_to(svc), metadata={"caller": "billing"})
    failed = [e.execution_failed for e in events if e.HasField("execution_failed")]
    assert len(failed) == 1 and failed[0].execution_id.startswith("exec_") and failed[0].tool == "flaky"
    result = next(e.tool_result for e in events if e.HasField("tool_result"))
    assert result.attempts == 2 and result.error == "upstream 503 (call 2)"
    await svc.server.stop(0)
    await svc.close()

    again = await start_service(FAIL_THEN_ANSWER, tools=policy_tools(), policies=overrides)
    path = again.config.data_dir / "deadletter.db"
    assert main(["list", "--db", str(path)]) == 0
    listed = capsys.readouterr().out
    assert failed[0].execution_id in listed and "flaky  error  attempts=2" in listed
    assert main(["show", failed[0].execution_id, "--db", str(path)]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["input"] == {"text": "boom"} and shown["run_id"] == events[0].run_id
    assert "ToolError" in shown["traceback"]
    assert main(["show", "exec_nope", "--db", str(path)]) == 1


async def test_a_lone_surrogate_in_the_error_does_not_lose_the_dead_letter(tmp_path: Path) -> None:
    store = DeadLetterStore(tmp_path / "deadletter.db")
    letter = await capture(
        store,
        run_id="run_1",
        call_id="c1",
        tool="fail",
        input={"text": "\ud83d"},
        status="error",
        error_type="ToolError",
        message="cannot do \ud83d",
        traceback="ToolError: cannot do \ud83d",
        attempts=1,
    )
    assert letter is not None
    stored = store.get(letter.execution_id)
    store.close()
    assert stored is not None and stored.message == "cannot do \ufffd" and stored.input == {"text": "\ud83d"}


def _letter(n: int, created_at: float) -> DeadLetter:
    return DeadLetter(
        execution_id=f"exec_{n}",
        created_at=created_at,
        run_id="run_1",
        call_id=f"c{n}",
        tool="fail",
        input={},
        status="error",
        error_type="ToolError",
        message="boom",
        traceback="",
        attempts=1,
    )


async def test_dead_letters_past_their_retention_are_deleted_at_start_and_hourly(tmp_path: Path) -> None:
    day, t0 = 86400.0, 1_000_000.0
    now = [t0]
    path = tmp_path / "deadletter.db"

    def kept(store: DeadLetterStore) -> set[str]:
        return {letter.execution_id for letter in store.recent()}

    store = DeadLetterStore(path, retention_s=day, clock=lambda: now[0])
    await store.add(_letter(1, t0 - 2 * day))  # already past its retention: the next purge takes it
    await store.add(_letter(2, t0))
    now[0] = t0 + 1800
    await store.add(_letter(3, now[0]))
    assert kept(store) == {"exec_1", "exec_2", "exec_3"}  # within the hour since the last purge: none yet
    now[0] = t0 + 5400
    await store.add(_letter(4, now[0]))
    assert kept(store) == {"exec_2", "exec_3", "exec_4"}
    store.close()
    now[0] = t0 + 5400 + day - 100
    reopened = DeadLetterStore(path, retention_s=day, clock=lambda: now[0])  # a restart purges at once
    assert kept(reopened) == {"exec_4"}
    reopened.close()
    forever = DeadLetterStore(path, clock=lambda: now[0] + 100 * day)  # no retention: the CLI's, kept for ever
    assert kept(forever) == {"exec_4"}
    forever.close()
