"""Every line logged inside a run names the run: the loop's, the executor's, a tool's own (in its coroutine and in
the threads it starts), the model adapter's; and no line logged outside a run is taken for one of its lines."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from conftest import make_config, run_events
from fake_anthropic import FakeAnthropic
from fake_tools import all_tools
from service import telemetry
from service.models.anthropic import AnthropicModel
from service.rpc.server import Service
from service.wiring import start
from tools.base import JSON, Tool

tool_log = logging.getLogger("tools.chatty")


class ChattyInput(BaseModel):
    text: str


class Chatty(Tool[ChattyInput]):
    """Logs a line from its coroutine and one from a worker thread, as tools that wrap blocking code do."""

    name = "chatty"
    description = "Logs what it does."
    Input = ChattyInput

    async def run(self, args: ChattyInput) -> JSON:
        tool_log.warning("chatty in its coroutine")
        await asyncio.to_thread(tool_log.warning, "chatty in a thread")
        return {"said": args.text}


@pytest.fixture
def lines() -> Iterator[io.StringIO]:
    """What the service's log handler writes, at INFO, for the test's duration."""
    out = io.StringIO()
    handler = telemetry.json_handler(out)
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    yield out
    root.removeHandler(handler)
    root.setLevel(level)


@pytest.fixture
async def service(tmp_path: Path) -> AsyncIterator[tuple[FakeAnthropic, Service]]:
    async with FakeAnthropic() as fake:
        model = AnthropicModel(api_key="test-key", base_url=fake.base_url, default_model="claude-sonnet-4-6")
        retry = {"attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}
        config = make_config(tmp_path, model={"retry": retry})
        svc = await start(config, metrics=False, tools={**all_tools(), "chatty": Chatty()}, model=model)
        try:
            yield fake, svc
        finally:
            await svc.server.stop(0)
            await svc.close()


def parsed(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


async def test_every_line_logged_inside_a_run_carries_its_run_id(
    service: tuple[FakeAnthropic, Service], channel_to: Any, lines: io.StringIO
) -> None:
    fake, svc = service
    fake.script_http_error(529, headers={"retry-after-ms": "1"})
    fake.script_turn(tool_uses=[("chatty", {"text": "hi"})])
    fake.script_turn(text="Done.")
    events = await run_events(channel_to(svc), message="go", tools=["chatty"])
    assert events[-1].final_response.text == "Done."
    run_id = events[0].run_id
    logged = [line for line in parsed(lines) if line["logger"] != "aiohttp.access"]  # the fake model's server
    messages = {line["msg"]: line for line in logged}
    for expected in ("model turn failed, retrying", "chatty in its coroutine", "chatty in a thread", "tool call ended"):
        assert messages[expected].get("run_id") == run_id, messages[expected]
    # and every other line the service logged (the SDK's requests among them) with it: nothing else was running
    assert [line for line in logged if line.get("run_id") != run_id] == []
    assert any(line["logger"].startswith("httpx") for line in logged)  # the model adapter's HTTP client


async def test_a_line_logged_outside_a_run_names_no_run(
    service: tuple[FakeAnthropic, Service], channel_to: Any, lines: io.StringIO
) -> None:
    fake, svc = service
    fake.script_turn(text="Done.")
    await run_events(channel_to(svc))
    tool_log.warning("after the run")
    after = next(line for line in parsed(lines) if line["msg"] == "after the run")
    assert "run_id" not in after


def test_the_service_log_handler_names_the_run_of_the_context_that_logs(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level

    def in_run() -> None:
        telemetry.bind_run("run_abc")
        tool_log.warning("inside")
        tool_log.warning("named", extra={"run_id": "run_other"})  # a line that names its run keeps it

    try:
        telemetry.setup_logging("INFO")
        contextvars.copy_context().run(in_run)  # a context of its own, as a run's task has
        tool_log.warning("outside")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [(line["msg"], line.get("run_id")) for line in logged] == [
        ("inside", "run_abc"),
        ("named", "run_other"),
        ("outside", None),
    ]


def test_http_clients_request_lines_stay_out_of_the_log(capsys: pytest.CaptureFixture[str]) -> None:
    """An outside finding: httpx logged every request's full URL at INFO, a webhook's query-string token with it."""
    root, client = logging.getLogger(), logging.getLogger("httpx")
    handlers, level, client_level = root.handlers[:], root.level, client.level
    try:
        telemetry.setup_logging("DEBUG")
        client.info('HTTP Request: POST http://127.0.0.1:18281/cb?token=WEBHOOK-SECRET "HTTP/1.1 200 OK"')
        client.warning("a warning of its own")
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        client.setLevel(client_level)
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert [line["msg"] for line in logged] == ["a warning of its own"]
