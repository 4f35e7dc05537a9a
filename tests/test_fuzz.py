"""Hostile input, generated: the request path against a real server on 127.0.0.1:0, and the tool-input path through
the executor with every built-in tool's real `validate()`. Whatever arrives (arbitrary text, huge or deeply nested
JSON, wrong types, unknown fields, NaN), the answer is a clear status or a tool result, never a crash or a hang.

Derandomized (the same examples on every run) and small enough for CI: a few seconds in all. Hypothesis drives a
sync test in a worker thread whose examples run on the test's event loop (`fuzz`), so the server and channel stay on
the loop that made them and one server serves every example.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service import events as ev
from service.executor import Executor, RunContext, ToolCallRequest
from service.records.audit import AuditLog, verify
from service.records.deadletter import DeadLetterStore
from tools import (
    ToolConfig,
    http_request,
    query_database,
    search_documents,
    shipment_report,
    shipment_tracker,
    tracking_snapshot,
)
from tools.base import Tool

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    # One server (or executor) serves all the examples of a test: that is the point, not an accident.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# Statuses a hostile request may get; each must come with a message saying what was wrong.
CLEAR = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.FAILED_PRECONDITION,
}

TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)  # protobuf strings are UTF-8: no surrogates
HUGE = st.builds(
    lambda piece, n: piece * n,
    st.sampled_from(["x", "é", "\0", " ", "🙂"]),
    st.sampled_from([1, 40_000, 102_401]),
)
OVER_RECEIVE_LIMIT = st.just("x" * (4 * 1024 * 1024 + 1))  # past limits.max_receive_bytes: refused by gRPC itself
UINT32 = st.integers(0, 2**32 - 1)
SMALL = st.integers(0, 70)
OPTIONAL_UINT = st.none() | UINT32 | SMALL


def nested(depth: int, kind: str) -> Any:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value] if kind == "list" else {"k": value}
    return value


DEEP = st.builds(nested, st.sampled_from([50, 500, 5000]), st.sampled_from(["list", "dict"]))
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | TEXT
    | st.sampled_from(["SELECT 1", "SELECT * FROM orders", "http://127.0.0.1/", "AT335493870", "delayed"])
)
JSON_VALUES = st.recursive(
    SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3), max_leaves=12
)


@st.composite
def requests(draw: st.DrawFn) -> pb.RunAgentRequest:
    request = pb.RunAgentRequest(
        message=draw(st.one_of(TEXT, TEXT, HUGE, st.just("Which shipments are late?"), OVER_RECEIVE_LIMIT)),
        model=draw(TEXT),
        tools=draw(st.lists(st.sampled_from(["echo", "fail", "sleep", "count", "nope", "", "ECHO"]), max_size=4)),
        metadata=draw(st.dictionaries(TEXT, TEXT | st.just("v" * 20_000), max_size=70)),
        idempotency_key=draw(st.sampled_from(["", "", "key-a", "key-b"])),
        on_disconnect=draw(st.sampled_from([0, 1, 2, 7])),
    )
    if draw(st.booleans()):
        request.system = draw(TEXT | HUGE)
    for name in ("max_turns", "max_tokens", "max_tool_calls", "max_output_tokens"):
        value = draw(OPTIONAL_UINT)
        if value is not None:
            setattr(request, name, value)
    return request


async def fuzz(check: Callable[..., Awaitable[None]], *, examples: int = 60, **strategies: Any) -> None:
    """Run `check` on generated examples: hypothesis in a worker thread, each example on this event loop."""
    loop = asyncio.get_running_loop()

    @settings(FUZZ, max_examples=examples)
    @given(**strategies)
    def run(**example: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(**example), loop).result(timeout=60)

    await asyncio.to_thread(run)


async def outcome(call: Any) -> tuple[list[pb.AgentEvent], grpc.aio.AioRpcError | None]:
    events: list[pb.AgentEvent] = []
    try:
        async with asyncio.timeout(15):  # a backstop: the gRPC deadline below should end any call first
            async for event in call:
                events.append(event)
    except grpc.aio.AioRpcError as err:
        return events, err
    return events, None


def assert_clear(err: grpc.aio.AioRpcError) -> None:
    assert err.code() in CLEAR, f"{err.code()}: {err.details()}"
    assert err.details(), f"{err.code()} without a message"


async def test_run_agent_answers_any_request_with_a_stream_or_a_clear_status(
    start_service: Any, channel_to: Any
) -> None:
    svc = await start_service()
    service = stub(channel_to(svc))

    async def check(request: pb.RunAgentRequest) -> None:
        events, err = await outcome(service.RunAgent(request, timeout=10))
        if err is None:
            assert events and events[-1].WhichOneof("event") == "final_response"
            return
        assert_clear(err)
        if events:  # the run started, then failed: its error event says the same as the status
            assert events[-1].WhichOneof("event") == "error"
            assert events[-1].error.code == err.code().name

    await fuzz(check, request=requests())


async def test_other_rpcs_answer_unknown_and_odd_ids_clearly(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    service = stub(channel_to(svc))

    async def check(run_id: str, after_seq: int, mode: int) -> None:
        for call in (
            service.GetRun(pb.GetRunRequest(run_id=run_id), timeout=5),
            service.CancelRun(pb.CancelRunRequest(run_id=run_id, mode=mode), timeout=5),  # type: ignore[arg-type]
        ):
            try:
                await call
            except grpc.aio.AioRpcError as err:
                assert_clear(err)
        events, err = await outcome(service.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=after_seq), timeout=5))
        assert not events and err is not None
        assert_clear(err)

    await fuzz(check, run_id=TEXT | HUGE, after_seq=st.integers(0, 2**63 - 1), mode=st.sampled_from([0, 1, 2]))


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


@st.composite
def unknown_fields(draw: st.DrawFn) -> bytes:
    """Well-formed protobuf fields the request type does not have (numbers past its last): varints and byte strings."""
    first = max(f.number for f in pb.RunAgentRequest.DESCRIPTOR.fields) + 1
    out = b""
    for _ in range(draw(st.integers(1, 5))):
        number = draw(st.integers(first, 2**29 - 1))
        if draw(st.booleans()):
            out += varint(number << 3) + varint(draw(st.integers(0, 2**64 - 1)))
        else:
            payload = draw(st.binary(max_size=200))
            out += varint(number << 3 | 2) + varint(len(payload)) + payload
    return out


def raw_run_agent(channel: grpc.aio.Channel) -> Any:
    return channel.unary_stream(
        "/agent.v1.AgentService/RunAgent", request_serializer=None, response_deserializer=pb.AgentEvent.FromString
    )


async def test_unknown_fields_are_ignored(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    raw = raw_run_agent(channel_to(svc))
    known = pb.RunAgentRequest(message="hello").SerializeToString()

    async def check(extra: bytes) -> None:
        events, err = await outcome(raw(known + extra, timeout=10))
        assert err is None, f"{err.code()}: {err.details()}"
        assert events[-1].WhichOneof("event") == "final_response"

    await fuzz(check, examples=25, extra=unknown_fields())


async def test_corrupt_request_bytes_get_invalid_argument(start_service: Any, channel_to: Any) -> None:
    svc = await start_service()
    raw = raw_run_agent(channel_to(svc))

    async def check(data: bytes) -> None:
        events, err = await outcome(raw(data, timeout=10))
        if err is not None:
            assert_clear(err)

    await fuzz(check, examples=25, data=st.binary(min_size=1, max_size=300))


# The tool-input path.


def builtin_tools(data_dir: Path) -> dict[str, Tool[Any]]:
    config = ToolConfig(data_dir=data_dir)
    tools: list[Tool[Any]] = [
        query_database.create(config),
        search_documents.create(config),
        http_request.create(ToolConfig(data_dir=data_dir, options={"allow_hosts": ["127.0.0.1:9"], "timeout_s": 1})),
        shipment_tracker.create(config),
        tracking_snapshot.create(config),
    ]
    return {t.name: t for t in tools}


# Plausible values per input field, so that well-formed calls reach the tools themselves.
SQL = st.sampled_from(
    [
        "SELECT * FROM orders",
        "SELECT ?",
        "SELECT hex(randomblob(100000)) FROM order_items",
        "DELETE FROM orders",
        "SELECT 1; SELECT 2",
        "WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n) SELECT count(*) FROM n",
    ]
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "sql": SQL | TEXT,
    "limit": st.integers(1, 1000) | st.integers(-5, 2000),
    "params": st.lists(SCALARS, max_size=4),
    "url": st.sampled_from(["http://127.0.0.1:9/x", "http://169.254.169.254/", "ftp://x/", "http://[::1]/"]) | TEXT,
    "method": st.sampled_from(["GET", "POST", "PUT"]),
    "headers": st.dictionaries(TEXT, TEXT, max_size=3),
    "json_body": JSON_VALUES | DEEP,
    "query": st.sampled_from(["delayed shipment", "carrier", '"unbalanced', "AND OR NOT *", "x" * 400]) | TEXT,
    "tracking_number": st.sampled_from(["AT335493870", "SK162196678", "ZZ000000000"]) | TEXT,
}


@st.composite
def tool_calls(draw: st.DrawFn, tools: dict[str, Tool[Any]]) -> ToolCallRequest:
    name = draw(st.sampled_from([*tools, "no_such_tool"]))
    fields = list(tools[name].input_schema().get("properties", {})) if name in tools else []
    keys = st.sampled_from([*fields, "unknown_field", ""]) | TEXT
    values = JSON_VALUES | DEEP | HUGE
    data: Any = draw(st.dictionaries(keys, values, max_size=5))
    if fields and draw(st.integers(0, 3)):  # mostly plausible, so that the tools themselves get to run
        data = {field: draw(FIELD_VALUES.get(field, SCALARS)) for field in fields if draw(st.integers(0, 5))}
        data |= draw(st.dictionaries(keys, values, max_size=2))
    parse_error = draw(st.sampled_from([None] * 7 + ["Expecting value: line 1 column 1 (char 0)"]))
    return ToolCallRequest(call_id="c1", name=name, input=data, parse_error=parse_error)


async def test_a_field_the_model_made_up_is_refused_by_every_builtin_tool(tmp_path: Path) -> None:
    """Ignored, a made-up field (`max_results`, a misspelt `header`) would leave the model believing it had effect;
    the schema says so up front, and a call sending one is REJECTED naming it."""
    tools = {**builtin_tools(tmp_path), "shipment_report": shipment_report.create(ToolConfig(data_dir=tmp_path))}
    executor = Executor(tools, timeout_s=5)
    run = RunContext(run_id="run_extra", offered=frozenset(tools))
    for name, tool in tools.items():
        assert tool.input_schema().get("additionalProperties") is False, name
        request = ToolCallRequest(call_id="c1", name=name, input={"max_results": 3})
        (result,) = [e async for e in executor.execute(request, run) if isinstance(e, ev.ToolResult)]
        assert result.status is ev.ToolStatus.REJECTED and "max_results" in result.error, name
    await executor.aclose()


async def test_executor_turns_any_tool_input_into_a_result(tmp_path: Path) -> None:
    tools = builtin_tools(tmp_path)

    async def no_wait(seconds: float) -> None:
        return None

    audit = AuditLog(tmp_path / "audit.db")
    executor = Executor(
        tools, timeout_s=5, audit=audit, dead_letter=DeadLetterStore(tmp_path / "dead.db"), sleep=no_wait
    )
    run = RunContext(run_id="run_fuzz", offered=frozenset(tools))
    calls = 0

    async def check(request: ToolCallRequest) -> None:
        nonlocal calls
        async with asyncio.timeout(10):
            events = [e async for e in executor.execute(request, run)]
        calls += 1
        results = [e for e in events if isinstance(e, ev.ToolResult)]
        assert len(results) == 1 and events[-1] is results[0]
        result = results[0]
        assert isinstance(result.status, ev.ToolStatus)
        if request.parse_error is not None or request.name not in tools:
            assert result.status is ev.ToolStatus.REJECTED
        if not result.ok:
            assert result.error and not result.error.startswith("internal error"), result.error
        else:
            json.dumps(result.data, allow_nan=False)  # what the model gets is plain JSON
            assert not (isinstance(result.data, float) and math.isnan(result.data))

    try:
        await fuzz(check, examples=100, request=tool_calls(tools))
    finally:
        await executor.aclose()
        for tool in tools.values():
            await tool.aclose()
    verdict = verify(tmp_path / "audit.db")
    assert verdict.ok and verdict.rows == calls  # every call recorded, hostile ones too


class Node(BaseModel):
    child: Node | None = None


class Recursive(Tool[Node]):
    name = "recursive"
    description = "Takes a tree."
    Input = Node

    async def run(self, args: Node) -> Any:
        return "ran"


class Raising(Recursive):
    """Own validation rules that blow up: on deep input, and on a bug."""

    name = "raising"

    def validate(self, raw: Any) -> Node:
        if "bug" in raw:
            raise RuntimeError("a bug in the rules")
        return self._depth(raw)

    def _depth(self, raw: Any) -> Node:
        return Node(child=self._depth(raw["child"])) if isinstance(raw, dict) and "child" in raw else Node()


async def test_input_too_deep_for_any_validator_is_rejected() -> None:
    tools: dict[str, Tool[Any]] = {"recursive": Recursive(), "raising": Raising()}
    executor = Executor(tools)
    run = RunContext(run_id="run_deep", offered=frozenset(tools))
    deep: Any = {}
    for _ in range(20_000):
        deep = {"child": deep}

    async def result(name: str, data: Any) -> ev.ToolResult:
        events = [e async for e in executor.execute(ToolCallRequest(call_id="c", name=name, input=data), run)]
        assert isinstance(events[-1], ev.ToolResult)
        return events[-1]

    refused = await result("recursive", deep)  # pydantic's own recursion guard: a ValidationError
    assert refused.status is ev.ToolStatus.REJECTED and len(refused.error) < 2100
    assert refused.error.startswith("invalid input for recursive: child.child.child.….child.child.child:")
    refused = await result("raising", deep)  # the tool's own rules: a RecursionError
    assert (refused.status, refused.error) == (
        ev.ToolStatus.REJECTED,
        "invalid input for raising: the input is nested too deeply",
    )
    refused = await result("raising", {"bug": 1})
    assert (refused.status, refused.error) == (
        ev.ToolStatus.REJECTED,
        "invalid input for raising: RuntimeError: a bug in the rules",
    )
    assert (await result("recursive", {"child": {"child": None}})).data == "ran"
