"""What recovery will need from the tool contract (issue 18): every call's idempotency key reaches its tool (on the
event loop, in a thread, on a retry, in the fallback, in a sandboxed tool's payload) and `http_request` sends it;
tools declare what their calls change; a call not safe to repeat that a crash cut off ends OUTCOME_UNKNOWN."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

import pytest
from aiohttp import web
from pydantic import BaseModel

from agent.v1 import agent_pb2 as pb
from fake_tools import Count, CountInput, Echo, EchoInput
from service import codec
from service import events as ev
from service.executor import Executor, RunContext, ToolCallRequest
from service.policy.config import resolve
from service.policy.repeat import outcome_unknown
from service.records.audit import AuditLog
from service.records.deadletter import DeadLetterStore
from service.rpc.convert import to_proto
from service.turns import tool_result_block
from tools import ToolConfig, load_tools
from tools._sandbox import SandboxedTool
from tools.base import JSON, CallInfo, Tool, ToolError, current_call
from tools.http_request import HttpRequest
from tools.policy import ToolPolicy

S = ev.ToolStatus
KEY = "run_t:c1"


class Seen(Tool[EchoInput]):
    """Records the call it runs for: on the event loop, or (`threaded`) from a worker thread."""

    name = "seen"
    description = "Says which call it runs for."
    Input = EchoInput

    def __init__(self, *, threaded: bool = False, failures: int = 0, name: str = "seen") -> None:
        self.threaded = threaded
        self.failures = failures
        self.calls: list[CallInfo | None] = []
        self.name = name  # type: ignore[misc]

    async def run(self, args: EchoInput) -> JSON:
        call = await asyncio.to_thread(current_call) if self.threaded else current_call()
        self.calls.append(call)
        if len(self.calls) <= self.failures:
            raise ToolError(f"upstream 503 (call {len(self.calls)})", retryable=True)
        return {"key": call.idempotency_key if call else None}


class SeenStream(Count):
    """Streams n chunks, each saying the call it was made for."""

    name = "seen_stream"

    async def stream(self, args: CountInput) -> AsyncIterator[JSON]:
        for i in range(args.n):
            await asyncio.sleep(0)
            call = current_call()
            yield {"i": i, "key": call.idempotency_key if call else None}


def executor(tools: Mapping[str, Tool[Any]], overrides: Mapping[str, Any] | None = None, **kwargs: Any) -> Executor:
    async def no_wait(seconds: float) -> None:
        pass

    return Executor(tools, policies=resolve(tools, overrides or {}), timeout_s=5, sleep=no_wait, **kwargs)


def run_ctx(ex: Executor) -> RunContext:
    return RunContext(run_id="run_t", offered=frozenset(ex.tools))


async def call(ex: Executor, name: str, input: dict[str, Any]) -> list[ev.Event]:
    return [e async for e in ex.execute(ToolCallRequest(call_id="c1", name=name, input=input), run_ctx(ex))]


def result_of(events: list[ev.Event]) -> ev.ToolResult:
    result = events[-1]
    assert isinstance(result, ev.ToolResult)
    return result


# the key reaches the tool


async def test_a_tool_knows_its_call_and_idempotency_key() -> None:
    seen = Seen()
    result = result_of(await call(executor({"seen": seen}), "seen", {"text": "x"}))
    assert result.status is S.OK and result.data == {"key": KEY}
    assert seen.calls == [CallInfo(run_id="run_t", call_id="c1", attempt=1)]
    assert current_call() is None  # set around the attempt only
    assert await seen.run(EchoInput(text="x")) == {"key": None}  # called directly, outside the executor


async def test_the_key_reaches_a_tool_working_in_a_thread() -> None:
    seen = Seen(threaded=True)
    result = result_of(await call(executor({"seen": seen}), "seen", {"text": "x"}))
    assert result.data == {"key": KEY} and seen.calls[0] is not None and seen.calls[0].attempt == 1


async def test_every_retry_has_the_same_key_and_counts_its_attempt() -> None:
    seen = Seen(failures=2)
    ex = executor({"seen": seen}, {"seen": {"retry": {"attempts": 3}}})
    events = await call(ex, "seen", {"text": "x"})
    assert [type(e).__name__ for e in events] == ["ToolCallReady", "ToolRetry", "ToolRetry", "ToolResult"]
    assert result_of(events).data == {"key": KEY}
    assert [(c.idempotency_key, c.attempt) for c in seen.calls if c] == [(KEY, 1), (KEY, 2), (KEY, 3)]


async def test_the_fallback_runs_with_the_call_s_key() -> None:
    primary, fallback = Seen(failures=9, name="primary"), Seen(name="fallback")
    ex = executor({"primary": primary, "fallback": fallback}, {"primary": {"fallback": "fallback"}})
    result = result_of(await call(ex, "primary", {"text": "x"}))
    assert (result.status, result.answered_by, result.data) == (S.OK, "fallback", {"key": KEY})
    assert [c.idempotency_key for c in primary.calls if c] == [KEY]
    assert fallback.calls == [CallInfo(run_id="run_t", call_id="c1", attempt=1)]


async def test_a_streaming_tool_has_its_call_at_every_chunk_and_the_consumer_never_does() -> None:
    ex = executor({"seen_stream": SeenStream()})
    consumer_saw = []
    async for event in ex.execute(ToolCallRequest(call_id="c1", name="seen_stream", input={"n": 3}), run_ctx(ex)):
        consumer_saw.append(current_call())  # the variable must not leak out of the tool's steps
        if isinstance(event, ev.ToolResult):
            assert event.data == [{"i": i, "key": KEY} for i in range(3)]
    assert consumer_saw == [None] * 5  # ready, three chunks, result


class KeyedEcho(SandboxedTool[EchoInput]):
    """A sandboxed tool whose program needs the key: `prepare` (in the service, in the attempt) puts it in the
    payload."""

    name: ClassVar[str] = "sandboxed_echo"
    description: ClassVar[str] = "Echoes its payload from the sandbox."
    Input: ClassVar[type[BaseModel]] = EchoInput

    async def prepare(self, args: EchoInput) -> tuple[JSON, Mapping[str, Path]]:
        call = current_call()
        return {"text": args.text, "idempotency_key": call.idempotency_key if call else None}, {}


@pytest.fixture
def echo_program(tmp_path: Path) -> Path:
    program = tmp_path / "echo.py"
    program.write_text("import json, sys\nprint(json.dumps(json.load(sys.stdin)))\n")
    return program


async def test_a_sandboxed_program_gets_the_key_through_its_payload(tmp_path: Path, echo_program: Path) -> None:
    program = type("SandboxedEcho", (KeyedEcho,), {"program": echo_program})
    tool = program(ToolConfig(data_dir=tmp_path))
    if tool.unavailable:
        pytest.skip(f"no sandbox here: {tool.unavailable}")
    result = result_of(await call(executor({tool.name: tool}), tool.name, {"text": "x"}))
    assert result.status is S.OK, result.error
    assert result.data == {"text": "x", "idempotency_key": KEY}


# http_request sends it


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[list[str]]]]:
    """A local upstream that records the Idempotency-Key (and X-Request-Id) headers of each request; /flaky answers
    503 first."""
    keys: list[list[str]] = []

    async def record(request: web.Request) -> web.Response:
        renamed = [f"X-Request-Id: {v}" for v in request.headers.getall("X-Request-Id", [])]
        keys.append(request.headers.getall("Idempotency-Key", []) + renamed)
        if request.path == "/flaky" and len(keys) == 1:
            return web.Response(status=503, text="try again")
        return web.json_response({"ok": True})

    app = web.Application()
    for path in ("/charge", "/flaky"):
        app.router.add_post(path, record)
        app.router.add_get(path, record)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", keys
    finally:
        await runner.cleanup()


async def http_call(tmp_path: Path, input: dict[str, Any], **options: Any) -> ev.ToolResult:
    tool = HttpRequest(ToolConfig(data_dir=tmp_path, options={"allow_hosts": ["127.0.0.1"], **options}))
    try:
        return result_of(await call(executor({tool.name: tool}), tool.name, input))
    finally:
        await tool.aclose()


async def test_http_request_sends_the_key_on_every_attempt(
    upstream: tuple[str, list[list[str]]], tmp_path: Path
) -> None:
    base, keys = upstream
    result = await http_call(tmp_path, {"method": "POST", "url": f"{base}/flaky", "json_body": {"amount": 5}})
    assert (result.status, result.attempts) == (S.OK, 2)
    assert keys == [[KEY], [KEY]]  # the re-sent POST is recognisable as the same one
    await http_call(tmp_path, {"url": f"{base}/charge"})
    assert keys[-1] == [KEY]  # a GET too: the header names the call, whatever the method


async def test_a_key_the_request_sets_is_kept_and_the_header_can_be_turned_off(
    upstream: tuple[str, list[list[str]]], tmp_path: Path
) -> None:
    base, keys = upstream
    mine = {"method": "POST", "url": f"{base}/charge", "headers": {"idempotency-key": "order-7"}}
    assert (await http_call(tmp_path, mine)).status is S.OK
    assert keys[-1] == ["order-7"]
    assert (await http_call(tmp_path, {"method": "POST", "url": f"{base}/charge"}, idempotency_header=None)).ok
    assert keys[-1] == []
    renamed = await http_call(tmp_path, {"url": f"{base}/charge"}, idempotency_header="X-Request-Id")
    assert renamed.ok and keys[-1] == [f"X-Request-Id: {KEY}"]


# what calls change


async def test_the_shipped_tools_declare_what_their_calls_change(tmp_path: Path) -> None:
    tools = load_tools(tmp_path)
    try:
        declared = {name: tool.policy.side_effects for name, tool in tools.items()}
        assert declared == {
            "http_request": "unsafe",
            "query_database": "none",
            "search_documents": "none",
            "shipment_report": "none",
            "shipment_tracker": "none",
            "tracking_snapshot": "none",
        }
        ex = executor(tools)
        get = ToolCallRequest(call_id="c", name="http_request", input={"url": "http://api.internal/x"})
        post = ToolCallRequest(call_id="c", name="http_request", input={"method": "POST", "url": "http://a.b/x"})
        sql = ToolCallRequest(call_id="c", name="query_database", input={"sql": "SELECT 1"})
        assert (ex.repeat_safe(get), ex.repeat_safe(post), ex.repeat_safe(sql)) == (True, False, True)
        # an operator whose upstreams honour Idempotency-Key says so; a call that would be rejected never runs
        trusted = executor(tools, {"http_request": {"side_effects": "idempotent"}})
        assert trusted.repeat_safe(post)
        assert ex.repeat_safe(ToolCallRequest(call_id="c", name="http_request", input={"method": "DELETE"}))
        assert ex.repeat_safe(ToolCallRequest(call_id="c", name="nope", input={}))
    finally:
        for tool in tools.values():
            await tool.aclose()


def test_idempotent_is_still_read_as_side_effects_none() -> None:
    assert ToolPolicy().side_effects == "unsafe"  # a tool nobody has thought about
    assert ToolPolicy.model_validate({"idempotent": True, "cache": {"ttl_s": 5}}).side_effects == "none"
    with pytest.raises(ValueError, match="only allowed on a tool without side effects"):
        ToolPolicy.model_validate({"side_effects": "idempotent", "cache": {"ttl_s": 5}})
    # a config override in the old spelling wins over the tool's declaration, as any override does
    assert resolve({"echo": Echo()}, {"echo": {"idempotent": True}})["echo"].side_effects == "none"
    assert resolve({"echo": ReadOnlyEcho()}, {"echo": {"idempotent": False}})["echo"].side_effects == "unsafe"


class ReadOnlyEcho(Echo):
    policy = ToolPolicy(side_effects="none")


# OUTCOME_UNKNOWN


def test_outcome_unknown_reads_right_for_the_model_and_round_trips() -> None:
    result = outcome_unknown("c1", "http_request")
    block = tool_result_block(result)
    assert block["is_error"] is True and block["tool_use_id"] == "c1"
    assert block["content"] == (
        "outcome unknown: the call to http_request was interrupted (the process running it stopped before its "
        "result was recorded) and was not retried, because repeating it could repeat its side effect; it may or "
        "may not have taken effect: check before repeating it"
    )
    assert codec.loads(codec.dumps(result)) == result
    wire = to_proto(result, "run_t", 7).tool_result
    assert wire.status == pb.TOOL_STATUS_OUTCOME_UNKNOWN == 9
    assert (wire.call_id, wire.name, wire.error, wire.HasField("data")) == ("c1", "http_request", result.error, False)
    # every status has its namesake on the wire
    wire_names = {n.removeprefix("TOOL_STATUS_") for n in pb.ToolStatus.keys()}  # noqa: SIM118 - not a dict
    assert {s.name for s in S} == wire_names - {"UNSPECIFIED"}


async def test_resume_does_not_resend_an_unsafe_call_and_dead_letters_it(tmp_path: Path) -> None:
    seen = Seen()
    store, audit = DeadLetterStore(tmp_path / "dl.db"), AuditLog(tmp_path / "audit.db")
    ex = executor({"seen": seen}, dead_letter=store, audit=audit)
    interrupted = ToolCallRequest(call_id="c1", name="seen", input={"text": "pay"})
    events = [e async for e in ex.resume(interrupted, run_ctx(ex), attempts=2)]
    assert seen.calls == []  # not sent again
    failed, result = events
    assert isinstance(failed, ev.ExecutionFailed) and result == outcome_unknown("c1", "seen", attempts=2)
    letter = store.get(failed.execution_id)
    assert letter is not None
    assert (letter.run_id, letter.call_id, letter.status, letter.input) == (
        "run_t",
        "c1",
        "outcome_unknown",
        {"text": "pay"},
    )
    await ex.aclose()
    with sqlite3.connect(tmp_path / "audit.db") as db:
        rows = db.execute("SELECT tool, call_id, status FROM audit").fetchall()
    assert rows == [("seen", "c1", "outcome_unknown")]


async def test_resume_runs_a_call_safe_to_repeat_again_with_the_same_key() -> None:
    seen = Seen()
    ex = executor({"seen": seen}, {"seen": {"side_effects": "none"}})
    again = ToolCallRequest(call_id="c1", name="seen", input={"text": "look"})
    events = [e async for e in ex.resume(again, run_ctx(ex))]
    assert [type(e).__name__ for e in events] == ["ToolCallReady", "ToolResult"]
    assert result_of(events).data == {"key": KEY} and len(seen.calls) == 1
