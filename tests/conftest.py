"""Shared fixtures: a real service on 127.0.0.1:0 with the scripted model and test tools, and a channel to it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from backends import postgres_schema, redis_ns  # noqa: F401  (fixtures: the real Redis and PostgreSQL)
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from fake_anthropic import FakeAnthropic
from fake_tools import all_tools
from service import telemetry
from service.config import Config, Pacing
from service.models.scripted import Scenario, ScriptedModel
from service.rpc.server import Service
from service.wiring import start

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

ECHO_THEN_ANSWER = [
    {"thinking": "Echo first.", "text": "Calling echo.", "tool_calls": [{"name": "echo", "input": {"text": "hi"}}]},
    {"text": "The answer: {results}"},
]


def make_config(tmp_path: Path, **overrides: Any) -> Config:
    values: dict[str, Any] = {"listen": "127.0.0.1:0", "metrics_listen": "127.0.0.1:0", "data_dir": tmp_path / "var"}
    values.update(overrides)
    return Config.model_validate(values)


def scripted(turns: list[dict[str, Any]], pacing: Pacing | None = None) -> ScriptedModel:
    """The scenario `turns`, unpaced unless `pacing` is given."""
    scenario = Scenario.model_validate({"name": "test", "turns": turns})
    return ScriptedModel(scenario, pacing=pacing or Pacing(first_token_ms=0, token_interval_ms=0))


StartService = Callable[..., Any]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans finished during the test, through an SDK tracer provider installed for it alone."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_tracer_provider(provider)
    yield exporter
    telemetry.use_tracer_provider(None)
    provider.shutdown()


# What the stores log when a write fails and its records are lost: never a test's intent.
LOST_RECORDS = {
    ("service.records.audit", "audit write failed"),
    ("service.records.deadletter", "dead-letter write failed"),
}


@pytest.fixture
async def start_service(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> AsyncIterator[StartService]:
    """Start a service with the given scenario turns (and config overrides); all are stopped at teardown, and the
    test fails if one of them lost an audit or dead-letter record."""
    started: list[Service] = []

    async def _start(turns: list[dict[str, Any]] | None = None, *, tools: Any = None, **config: Any) -> Service:
        settings = make_config(tmp_path, **config)
        # the config's pacing when the test sets one (`model={"pacing": {...}}`), else unpaced
        pacing = settings.model.pacing if "pacing" in config.get("model", {}) else None
        svc = await start(
            settings,
            metrics=False,
            tools=all_tools() if tools is None else tools,
            model=scripted(turns or ECHO_THEN_ANSWER, pacing),
        )
        started.append(svc)
        return svc

    yield _start
    for svc in started:
        await svc.server.stop(0)
        await svc.close()
    lost = [r.getMessage() for r in (*caplog.get_records("call"), *caplog.records) if (r.name, r.msg) in LOST_RECORDS]
    assert not lost, f"a service of this test lost records: {lost}"


@pytest.fixture
async def channel_to() -> AsyncIterator[Callable[[Service], grpc.aio.Channel]]:
    channels: list[grpc.aio.Channel] = []

    def _open(svc: Service) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{svc.port}")
        channels.append(channel)
        return channel

    yield _open
    for channel in channels:
        await channel.close()


def stub(channel: grpc.aio.Channel) -> agent_pb2_grpc.AgentServiceStub:
    return agent_pb2_grpc.AgentServiceStub(channel)


async def run_events_of(call: Any) -> list[pb.AgentEvent]:
    """Every event of a streaming call, to its end (its error status raised as AioRpcError)."""
    return [e async for e in call]


async def run_events(channel: grpc.aio.Channel, **request: Any) -> list[pb.AgentEvent]:
    request.setdefault("message", "hello")
    return [e async for e in stub(channel).RunAgent(pb.RunAgentRequest(**request))]


async def cli(
    port: int, *args: str, host: str = "127.0.0.1", env: dict[str, str] | None = None
) -> tuple[int, str, str]:
    """`python -m service.client --target HOST:PORT ARGS…` as a person runs it: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service.client", "--target", f"{host}:{port}", *args),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=None if env is None else {**os.environ, **env},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
async def opened() -> AsyncIterator[Callable[[Any], Any]]:
    """Opens stores for the test and closes them after it."""
    stores: list[Any] = []

    async def open_(store: Any) -> Any:
        await store.open()
        stores.append(store)
        return store

    yield open_
    for store in reversed(stores):
        await store.aclose()


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    """A local server that speaks the Anthropic Messages API, scripted by the test."""
    async with FakeAnthropic() as server:
        yield server


@pytest.fixture
async def claude_service(fake: FakeAnthropic, tmp_path: Path) -> AsyncIterator[Service]:
    """The service on Claude through the real SDK against `fake`, with the test tools and quick model retries."""
    from service.models.anthropic import AnthropicModel

    model = AnthropicModel(api_key="test-key", base_url=fake.base_url, default_model="claude-sonnet-4-6")
    config = make_config(tmp_path, model={"retry": {"attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}})
    svc = await start(config, metrics=False, tools=all_tools(), model=model)
    yield svc
    await svc.server.stop(0)
    await svc.close()
