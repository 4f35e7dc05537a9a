"""What the benchmarks made us change on the hot path, held in place: garbage-collector tuning at start-up,
interceptor wrappers built once per method, and an offline model whose request record stays bounded."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import signal
import threading
import time
import typing
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from conftest import StartService, make_config
from service import events as ev
from service import tally, telemetry
from service.config import AuthConfig, GcConfig, Limits, Pacing
from service.models import base as m
from service.models.scripted import REQUESTS_KEPT, Scenario, ScriptedModel
from service.rpc import server
from service.rpc.auth import Authenticator, AuthInterceptor
from service.rpc.convert import to_proto
from service.rpc.interceptors import RejectUndecodable, wrap_handler
from service.rpc.server import pending_rpc_options, tune_gc
from service.telemetry import JsonFormatter, setup_logging
from service.wiring import start


@pytest.fixture
def restore_gc() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_tune_gc_freezes_start_up_objects_and_sets_thresholds(restore_gc: None) -> None:
    tune_gc(GcConfig())
    assert gc.get_threshold() == (100_000, 50, 100)
    assert gc.get_freeze_count() > 0


def test_tune_gc_can_keep_start_up_objects_collectable(restore_gc: None) -> None:
    gc.unfreeze()
    tune_gc(GcConfig(freeze=False, thresholds=(700, 10, 10)))
    assert gc.get_threshold() == (700, 10, 10)
    assert gc.get_freeze_count() == 0


def test_gc_config_refuses_a_zero_first_generation() -> None:
    with pytest.raises(ValidationError, match="gen0 must be at least 1"):
        GcConfig(thresholds=(0, 10, 10))


def _handler(name: str) -> grpc.RpcMethodHandler:
    async def respond(request: Any, context: Any) -> Any:
        yield pb.AgentEvent(run_id=name)

    return grpc.unary_stream_rpc_method_handler(respond, pb.RunAgentRequest.FromString, pb.AgentEvent.SerializeToString)


class _Details:
    def __init__(self, method: str) -> None:
        self.method = method
        self.invocation_metadata = ()


@pytest.mark.parametrize("make", [lambda: AuthInterceptor(Authenticator(AuthConfig())), RejectUndecodable])
async def test_interceptors_wrap_each_method_once(make: Any) -> None:
    interceptor = make()
    first, second = _handler("a"), _handler("b")
    current = first

    async def continuation(details: Any) -> grpc.RpcMethodHandler:
        return current

    run_agent = _Details("/agent.v1.AgentService/RunAgent")
    wrapped = await interceptor.intercept_service(continuation, run_agent)
    assert wrapped is not first and wrapped.unary_stream is not first.unary_stream
    assert await interceptor.intercept_service(continuation, run_agent) is wrapped
    # another method, or the same method served by a new handler, gets a wrapper of its own
    assert await interceptor.intercept_service(continuation, _Details("/agent.v1.AgentService/Other")) is not wrapped
    current = second
    rewrapped = await interceptor.intercept_service(continuation, run_agent)
    assert rewrapped is not wrapped


async def test_scripted_model_keeps_only_the_latest_requests() -> None:
    model = ScriptedModel(
        Scenario.model_validate({"name": "t", "turns": [{"text": "hi"}]}),
        pacing=Pacing(first_token_ms=0, token_interval_ms=0),
    )
    for i in range(REQUESTS_KEPT + 5):
        request = m.TurnRequest(
            model="m", system=None, messages=[{"role": "user", "content": str(i)}], tools=[], max_tokens=10
        )
        async for _ in model.stream_turn(request):
            pass
    assert len(model.requests) == REQUESTS_KEPT
    assert model.requests[-1].messages[0]["content"] == str(REQUESTS_KEPT + 4)
    assert model.requests[0].messages[0]["content"] == "5"


def test_json_log_lines_keep_their_utc_timestamp_to_the_millisecond() -> None:
    record = logging.LogRecord("service.test", logging.INFO, __file__, 1, "hello %s", ("there",), None)
    record.created, record.msecs = 1_795_827_723.456, 456.0  # 2026-11-28T01:02:03.456Z
    line = json.loads(JsonFormatter().format(record))
    assert line["ts"] == "2026-11-28T01:02:03.456Z" and line["msg"] == "hello there"
    record.created, record.msecs = 1_795_827_724.007, 7.0  # the next second, from the per-second cache
    assert json.loads(JsonFormatter().format(record))["ts"] == "2026-11-28T01:02:04.007Z"


def test_setup_logging_writes_json_lines_without_looking_up_the_caller(capsys: pytest.CaptureFixture[str]) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        setup_logging("INFO")
        logging.getLogger("service.test").info("tool call ended", extra={"tool": "echo"})
        assert logging._srcfile is None
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    line = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert line["msg"] == "tool call ended" and line["tool"] == "echo" and line["level"] == "info"


def test_pending_call_limits_keep_grpcs_proportions_and_default_to_five_times_grpcs() -> None:
    assert dict(pending_rpc_options(Limits())) == {
        "grpc.server.max_pending_requests": 5_000,
        "grpc.server.max_pending_requests_hard_limit": 15_000,
        "grpc.server_max_unrequested_time_in_server": 60,
    }
    with pytest.raises(ValidationError):
        Limits(max_pending_rpcs=2)


def test_every_event_type_has_the_metric_kind_of_its_oneof_field() -> None:
    oneof = {f.name for f in pb.AgentEvent.DESCRIPTOR.oneofs_by_name["event"].fields}
    kinds = {kind.kind for kind in typing.get_args(ev.Event)}
    assert kinds == oneof
    for event in (ev.TextDelta(turn=1, text="a"), ev.RunFailed(code="INTERNAL", message="m", retryable=False)):
        assert to_proto(event, "run_x", 1).WhichOneof("event") == event.kind


class _Context:
    """Enough of a servicer context for a stream that succeeds: no deadline, no status set."""

    def time_remaining(self) -> float | None:
        return None


async def test_events_sent_are_counted_by_kind_as_they_are_sent(start_service: StartService) -> None:
    def sent(kind: str) -> float:
        tally.flush()  # what a scrape does first
        return telemetry.EVENTS.labels(kind)._value.get()  # type: ignore[no-any-return]

    words = " ".join(f"w{i}" for i in range(80))
    svc = await start_service([{"text": words}], runs={"coalesce_window_s": 0, "subscriber_coalesce_lag": 10_000})
    before = sent("text_delta"), sent("final_response")
    stream = svc.servicer.RunAgent(pb.RunAgentRequest(message="go"), _Context())
    seen: list[str] = []
    try:
        while len(seen) < 65:
            seen.append(str((await anext(stream)).WhichOneof("event")))
        # counted in the tally as sent (service/sent.py): a scrape while the stream is still going sees them all
        assert sent("text_delta") - before[0] == seen.count("text_delta")
        seen += [str(e.WhichOneof("event")) async for e in stream]
    finally:
        await stream.aclose()
    assert sent("text_delta") - before[0] == seen.count("text_delta") > 65  # and those sent after it
    assert sent("final_response") - before[1] == 1


async def test_a_wrapped_handler_wrapped_again_gets_one_layer_running_both_checks_outer_first() -> None:
    seen: list[str] = []

    def check(name: str) -> Any:
        def run(request: Any, context: Any) -> None:
            seen.append(name)  # and let the call through

        return run

    original = _handler("a")
    inner = wrap_handler(original, check("inner"))
    outer = wrap_handler(inner, check("outer"))
    assert outer.unary_stream._guarded == (original.unary_stream, outer.unary_stream._guarded[1])
    events = [e async for e in outer.unary_stream(pb.RunAgentRequest(), None)]
    assert seen == ["outer", "inner"] and [e.run_id for e in events] == ["a"]


def test_labelled_metric_children_are_looked_up_once_and_are_prometheus_own() -> None:
    usage = telemetry.child(telemetry.EVENTS, "usage")
    assert usage is telemetry.child(telemetry.EVENTS, "usage") is telemetry.EVENTS.labels("usage")
    assert telemetry.child(telemetry.EVENTS, "usage") is not telemetry.child(telemetry.EVENTS, "text_delta")


async def test_serve_tunes_the_collector_once_serving_and_drains_on_sigterm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, restore_gc: None
) -> None:
    tuned: list[GcConfig] = []

    def tune_and_record(config: GcConfig) -> None:
        tuned.append(config)
        tune_gc(config)

    monkeypatch.setattr(server, "tune_gc", tune_and_record)
    gc.unfreeze()
    config = make_config(tmp_path, gc={"thresholds": [5_000, 20, 30]})
    serving = asyncio.create_task(server.serve(config, start))
    for _ in range(500):
        if tuned or serving.done():
            break
        await asyncio.sleep(0.01)
    assert tuned == [config.gc]
    assert gc.get_threshold() == (5_000, 20, 30) and gc.get_freeze_count() > 0
    os.kill(os.getpid(), signal.SIGTERM)  # caught by the loop's handler that serve() installed
    await asyncio.wait_for(serving, timeout=10)


def _burst(port: int, calls: int, outcomes: Counter[str]) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = agent_pb2_grpc.AgentServiceStub(channel)
        futures = [stub.ListTools.future(pb.ListToolsRequest(), timeout=10) for _ in range(calls)]
        for future in futures:
            try:
                future.result()
                outcomes["OK"] += 1
            except grpc.RpcError as exc:
                outcomes[exc.code().name] += 1


@pytest.mark.parametrize("limit", [3, None])
async def test_calls_waiting_for_a_busy_event_loop_are_kept_up_to_the_pending_limit(
    start_service: StartService, limit: int | None
) -> None:
    """30 calls arrive while the event loop is blocked, so grpc core queues them: with the default limit all are
    served once the loop is free; with a hard limit of 3, grpc cancels the calls beyond it."""
    svc = await start_service(**({"limits": {"max_pending_rpcs": limit}} if limit else {}))
    outcomes: Counter[str] = Counter()
    burst = threading.Thread(target=_burst, args=(svc.port, 30, outcomes))
    burst.start()
    time.sleep(0.5)  # noqa: ASYNC251 - on purpose: a blocked event loop takes up no call meanwhile
    await asyncio.to_thread(burst.join)
    if limit is None:
        assert outcomes == {"OK": 30}
    else:
        assert outcomes["OK"] <= limit and outcomes["CANCELLED"] >= 30 - limit
