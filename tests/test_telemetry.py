"""Telemetry after real runs: Prometheus metrics read from the real /metrics endpoint, spans captured with an
in-memory exporter (run → model_turn, run → tool_call → tool_retry / tool_fallback), trace ids in the JSON logs."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import REGISTRY
from test_process import _start as start_process

from agent.v1 import agent_pb2 as pb
from conftest import make_config, run_events, scripted, stub
from fake_tools import Backup, Flaky, policy_tools
from service import events as ev
from service import telemetry
from service.rpc.interceptors import tracing_interceptors
from service.wiring import start


def tools_for(flaky: str, down: str) -> dict[str, Any]:
    """Per-test tool names: Prometheus' registry is process-wide, so each test counts its own series."""
    tools = policy_tools()
    tools[flaky] = Flaky(failures=1, name=flaky)
    tools[down] = Flaky(failures=99, name=down)
    tools["backup"] = Backup()
    return tools


def policies(flaky: str, down: str) -> dict[str, Any]:
    fast = {"attempts": 2, "initial_backoff_s": 0.001, "max_backoff_s": 0.001}
    return {flaky: {"retry": fast}, down: {"retry": fast, "fallback": "backup"}}


def scenario(flaky: str, down: str) -> list[dict[str, Any]]:
    calls = [{"name": flaky, "input": {"text": "a"}}, {"name": down, "input": {"text": "b"}}]
    return [{"text": "Calling tools.", "tool_calls": calls}, {"text": "The answer: {results}"}]


async def test_metrics_endpoint_shows_calls_retries_fallbacks_and_latency(tmp_path: Path, channel_to: Any) -> None:
    flaky, down = "metrics_flaky", "metrics_down"
    config = make_config(tmp_path, policies=policies(flaky, down))
    svc = await start(config, metrics=True, tools=tools_for(flaky, down), model=scripted(scenario(flaky, down)))
    try:
        events = await run_events(channel_to(svc))
        assert events[-1].HasField("final_response")
        url = f"http://127.0.0.1:{svc.metrics_port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
    finally:
        await svc.server.stop(0)
        await svc.close()
    with pytest.raises(OSError):  # closing the service closed its metrics endpoint too
        await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5))
    expected = [
        f'agent_tool_calls_total{{outcome="ok",tool="{flaky}"}} 1.0',
        f'agent_tool_calls_total{{outcome="ok",tool="{down}"}} 1.0',
        f'agent_tool_retries_total{{tool="{flaky}"}} 1.0',
        f'agent_tool_retries_total{{tool="{down}"}} 1.0',
        f'agent_tool_fallbacks_total{{fallback="backup",tool="{down}"}} 1.0',
        f'agent_tool_call_duration_seconds_bucket{{le="0.001",tool="{flaky}"}}',
        f'agent_tool_call_duration_seconds_bucket{{le="60.0",tool="{flaky}"}} 1.0',
        f'agent_tool_circuit_state{{tool="{down}"}} 0.0',
        'agent_events_sent_total{kind="tool_retry"}',
        'agent_events_sent_total{kind="tool_fallback"}',
        "agent_time_to_first_event_seconds_count",
        "agent_model_turn_duration_seconds_count",
        "agent_active_runs",
    ]
    missing = [line for line in expected if line not in text]
    assert not missing, missing


def by_name(spans: tuple[ReadableSpan, ...], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


async def test_spans_nest_run_turns_calls_retries_and_fallbacks(
    start_service: Any, channel_to: Any, spans: InMemorySpanExporter
) -> None:
    flaky, down = "span_flaky", "span_down"
    svc = await start_service(scenario(flaky, down), tools=tools_for(flaky, down), policies=policies(flaky, down))
    events = await run_events(channel_to(svc))
    assert events[-1].HasField("final_response")
    for _ in range(100):  # the run span ends when the run task finishes, just after the last event
        if by_name(spans.get_finished_spans(), "run"):
            break
        await asyncio.sleep(0.01)
    finished = spans.get_finished_spans()
    (run,) = by_name(finished, "run")
    assert run.context is not None and run.attributes is not None
    assert run.attributes["run.id"] == events[0].run_id
    turns = by_name(finished, "model_turn")
    assert len(turns) == 2 and all(t.parent is not None and t.parent.span_id == run.context.span_id for t in turns)
    calls = {s.attributes["tool.name"]: s for s in by_name(finished, "tool_call") if s.attributes}
    assert all(c.parent is not None and c.parent.span_id == run.context.span_id for c in calls.values())
    flaky_call, down_call = calls[flaky], calls[down]
    assert flaky_call.attributes is not None and flaky_call.attributes["tool.attempts"] == 2
    assert flaky_call.attributes["tool.breaker_state"] == "closed" and not flaky_call.attributes["tool.cache_hit"]
    (first_failure,) = flaky_call.events  # its first attempt failed, the retry succeeded: the error is still there
    assert first_failure.name == "tool.attempt_failed" and first_failure.attributes is not None
    assert first_failure.attributes["tool.attempt"] == 1 and first_failure.attributes["tool.status"] == "error"
    assert first_failure.attributes["error"]
    retries = by_name(finished, "tool_retry")
    assert {r.parent.span_id for r in retries if r.parent} >= {flaky_call.context.span_id}  # type: ignore[union-attr]
    (fallback,) = by_name(finished, "tool_fallback")
    assert fallback.parent is not None and fallback.parent.span_id == down_call.context.span_id  # type: ignore[union-attr]
    assert fallback.attributes is not None and fallback.attributes["tool.name"] == "backup"
    assert down_call.attributes is not None and down_call.attributes["tool.answered_by"] == "backup"
    failed_retry = next(r for r in retries if r.parent and r.parent.span_id == down_call.context.span_id)  # type: ignore[union-attr]
    assert failed_retry.status.status_code is StatusCode.ERROR
    assert run.status.status_code is not StatusCode.ERROR


async def test_grpc_server_span_is_recorded_when_tracing(
    start_service: Any, channel_to: Any, spans: InMemorySpanExporter
) -> None:
    svc = await start_service()
    await run_events(channel_to(svc))
    rpc = await run_agent_spans(spans)
    assert rpc and rpc[0].kind.name == "SERVER"


async def run_agent_spans(spans: InMemorySpanExporter) -> list[ReadableSpan]:
    """The RunAgent server spans, once there is one: the interceptor ends it just after the call's status."""
    for _ in range(100):
        found = by_name(spans.get_finished_spans(), "/agent.v1.AgentService/RunAgent")
        if found:
            return found
        await asyncio.sleep(0.01)
    return []


async def test_a_failed_run_marks_its_grpc_server_span(
    start_service: Any, channel_to: Any, spans: InMemorySpanExporter
) -> None:
    # the stream's status is set rather than raised (service/rpc/servicer.py): the span must still carry it
    svc = await start_service(
        [{"text": "never", "fail": {"status": 529, "times": 10}}],
        model={"retry": {"attempts": 1}},
    )
    call = stub(channel_to(svc)).RunAgent(pb.RunAgentRequest(message="go"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        _ = [e async for e in call]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    (rpc,) = await run_agent_spans(spans)
    assert rpc.attributes is not None and rpc.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert rpc.status.status_code is StatusCode.ERROR and "failed after 1 attempt" in (rpc.status.description or "")


async def test_failed_tool_calls_mark_spans_error_and_logs_carry_trace_ids(
    spans: InMemorySpanExporter, caplog: pytest.LogCaptureFixture
) -> None:
    from service.executor import Executor, RunContext, ToolCallRequest

    ex = Executor(policy_tools(failures=9))
    request = ToolCallRequest(call_id="c", name="flaky", input={"text": "x"})
    with caplog.at_level(logging.INFO, logger="service.executor"):
        _ = [e async for e in ex.execute(request, RunContext(run_id="r", offered=frozenset({"flaky"})))]
    (call,) = by_name(spans.get_finished_spans(), "tool_call")
    assert call.status.status_code is StatusCode.ERROR and call.status.description == "error: upstream 503 (call 1)"
    ended = next(r for r in caplog.records if r.getMessage() == "tool call ended")
    line = json.loads(telemetry.JsonFormatter().format(ended))
    assert line["trace_id"] == format(call.context.trace_id, "032x")  # type: ignore[union-attr]
    assert line["span_id"] == format(call.context.span_id, "016x")  # type: ignore[union-attr]
    assert line["run_id"] == "r" and line["status"] == "error" and "elapsed_ms" in line


def test_tracing_is_off_without_otel_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_ENDPOINT", raising=False)
    monkeypatch.delenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", raising=False)
    assert not telemetry.setup_tracing()
    assert tracing_interceptors() == [] and not telemetry.tracing_enabled()


async def test_tool_names_the_model_made_up_share_one_label_value() -> None:
    # the model names the tool of a call: names it made up (or was talked into) must not each become a series
    from service.executor import Executor, RunContext, ToolCallRequest

    ex = Executor(policy_tools())
    run = RunContext(run_id="r", offered=frozenset({"echo"}))
    labels = {"tool": "(unknown)", "outcome": "rejected"}
    before = REGISTRY.get_sample_value("agent_tool_calls_total", labels) or 0
    for i in range(3):
        request = ToolCallRequest(call_id=f"c{i}", name=f"made_up_{i}", input={})
        _ = [e async for e in ex.execute(request, run)]
    exported = {s.labels.get("tool") for family in REGISTRY.collect() for s in family.samples}
    assert not {"made_up_0", "made_up_1", "made_up_2"} & exported
    assert REGISTRY.get_sample_value("agent_tool_calls_total", labels) == before + 3


class StuckExporter(SpanExporter):
    """A collector that does not answer: each export blocks until `answer` is set."""

    def __init__(self) -> None:
        self.answer = threading.Event()
        self.exports = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exports += 1
        self.answer.wait()
        return SpanExportResult.SUCCESS


async def test_shutdown_flushes_spans_but_does_not_wait_long_for_a_collector_that_does_not_answer() -> None:
    exporter = StuckExporter()
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=60_000))
    telemetry.use_tracer_provider(provider)
    try:
        telemetry.tracer().start_span("queued").end()
        assert exporter.exports == 0  # still queued: only the shutdown's flush can send it
        await asyncio.wait_for(asyncio.to_thread(telemetry.shutdown, 0.05), 5)
        assert exporter.exports == 1
    finally:
        exporter.answer.set()
        telemetry.use_tracer_provider(None)


async def test_the_process_exits_soon_after_sigterm_when_the_otlp_collector_does_not_answer(tmp_path: Path) -> None:
    collector = socket.socket()  # accepts connections (in its backlog) and never answers, like a black-holed route
    collector.bind(("127.0.0.1", 0))
    collector.listen(16)
    endpoint = f"http://127.0.0.1:{collector.getsockname()[1]}"
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "ANTHROPIC_API_KEY": "", "AGENT_METRICS_LISTEN": "127.0.0.1:0"}
    proc, serving = await start_process(tmp_path, "--listen", "127.0.0.1:0", env=env)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{serving['port']}") as channel:
            events = await run_events(channel, message="Which shipments are late?")
        assert events[-1].HasField("final_response")  # the unreachable collector did not hold up the run
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 30) == 0
        # the run's spans are queued for export: the exit waits telemetry.SHUTDOWN_FLUSH_S for them, not the
        # exporter's 10 s per batch (up to the batch processor's 30 s), past the pod's termination grace period
        assert time.monotonic() - started < telemetry.SHUTDOWN_FLUSH_S + 3
    finally:
        collector.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_circuit_state_gauge_follows_the_breaker_through_its_cooldown() -> None:
    from service.executor import Executor, RunContext, ToolCallRequest
    from service.policy.config import resolve

    now = [0.0]
    tools: dict[str, Any] = {"gauge_flaky": Flaky(failures=1, name="gauge_flaky"), "backup": Backup()}
    policy = {"gauge_flaky": {"retry": {"attempts": 1}, "breaker": {"failure_threshold": 1, "cooldown_s": 30}}}
    ex = Executor(tools, policies=resolve(tools, policy), clock=lambda: now[0])
    run = RunContext(run_id="r", offered=frozenset(tools))

    def gauge() -> float | None:
        return REGISTRY.get_sample_value("agent_tool_circuit_state", {"tool": "gauge_flaky"})

    async def call() -> None:
        _ = [e async for e in ex.execute(ToolCallRequest(call_id="c", name="gauge_flaky", input={"text": "x"}), run)]

    assert gauge() == 0
    await call()  # fails: the circuit opens
    assert gauge() == 2
    now[0] += 30  # cooled down: the next call is let through as the trial, though none has come yet
    assert ex.guards["gauge_flaky"].breaker is not None and ex.guards["gauge_flaky"].breaker.state.value == "half_open"
    assert gauge() == 1
    await call()  # the trial succeeds
    assert gauge() == 0


async def test_a_call_closed_just_after_its_result_still_ends_its_span(spans: InMemorySpanExporter) -> None:
    # merge() closes a call's events when its run stops while the result waits for room in the turn's queue
    from service.events import ToolResult
    from service.executor import Executor, RunContext, ToolCallRequest

    ex = Executor(policy_tools(failures=9))
    request = ToolCallRequest(call_id="c", name="flaky", input={"text": "x"})
    events = ex.execute(request, RunContext(run_id="r", offered=frozenset({"flaky"})))
    async for event in events:
        if isinstance(event, ToolResult):
            break
    await events.aclose()  # type: ignore[attr-defined]
    (call,) = by_name(spans.get_finished_spans(), "tool_call")
    assert call.status.status_code is StatusCode.ERROR and call.status.description == "error: upstream 503 (call 1)"


class QuietContext:
    """Enough of a grpc.aio servicer context to drive a handler's generator the way grpc does, one message at a time."""

    def time_remaining(self) -> float | None:
        return None

    def set_code(self, code: grpc.StatusCode) -> None:
        pass

    def set_details(self, details: str) -> None:
        pass


def first_event_buckets() -> dict[str, float]:
    family = next(f for f in REGISTRY.collect() if f.name == "agent_time_to_first_event_seconds")
    return {s.labels.get("le", s.name): s.value for s in family.samples if not s.name.endswith("_created")}


async def first_event_observed(svc: Any, send_s: float) -> dict[str, float]:
    """The change in the first-event histogram when grpc takes `send_s` to send a run's first event."""
    now = [100.0]
    svc.servicer.clock = lambda: now[0]
    before = first_event_buckets()
    events = svc.servicer.RunAgent(pb.RunAgentRequest(message="go"), QuietContext())
    try:
        first = await anext(events)  # handed to grpc, which sends it, then asks for the next one
        assert first.HasField("run_started")
        now[0] += send_s
        await anext(events)
    finally:
        await events.aclose()
    after = first_event_buckets()
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


async def test_time_to_first_event_counts_until_the_event_is_sent(start_service: Any) -> None:
    svc = await start_service()
    observed = await first_event_observed(svc, send_s=5.0)
    assert observed["agent_time_to_first_event_seconds_sum"] == pytest.approx(5.0)
    # a first event is usually out within a millisecond: the histogram tells 0.2 ms from 0.9 ms
    fast, slower = await first_event_observed(svc, 0.0002), await first_event_observed(svc, 0.0009)
    assert {le for le in fast if le[0].isdigit()} != {le for le in slower if le[0].isdigit()}


def bucket_counts(metric: str) -> dict[str, float]:
    family = next(f for f in REGISTRY.collect() if f.name == metric)
    return {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}


async def test_model_turn_histogram_tells_long_turns_apart() -> None:
    # a turn is a whole streamed answer, retries included: minutes for a long one (model.timeout_s is 120 s a try)
    from tenacity import wait_none

    from service.config import ModelRetry
    from service.model_turn import ModelTurn

    async def buckets_counting(seconds: float) -> set[str]:
        times = iter([0.0, seconds])  # the turn's start and end, as the loop's clock reads them
        before = bucket_counts("agent_model_turn_duration_seconds")
        with ModelTurn(1, ModelRetry(), wait_none(), lambda: next(times)):  # what the loop spans each turn with
            pass
        after = bucket_counts("agent_model_turn_duration_seconds")
        return {le for le, n in after.items() if n != before[le]}

    assert await buckets_counting(100.0) != await buckets_counting(290.0)  # a finite bucket between the two


async def test_model_tokens_are_counted_per_completed_turn() -> None:
    from service.executor import Executor
    from service.loop import AgentLoop, RunSpec

    def tokens() -> dict[str, float]:
        family = next(f for f in REGISTRY.collect() if f.name == "agent_model_tokens")
        return {s.labels["kind"]: s.value for s in family.samples if s.name.endswith("_total")}

    before = tokens()
    loop = AgentLoop(scripted([{"text": "an answer"}]), Executor({}))
    spec = RunSpec(run_id="r", message="hi", model="m", system=None, max_turns=2, max_tokens=10, tools=())
    events = [e async for e in loop.run(spec)]
    final = events[-1]
    assert isinstance(final, ev.FinalResponse) and final.output_tokens > 0
    after = tokens()
    assert after["input"] - before.get("input", 0) == final.input_tokens
    assert after["output"] - before.get("output", 0) == final.output_tokens
