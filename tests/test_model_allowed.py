"""`model.allowed`: an operator's list of the model ids a request may name (empty: any, as before it existed)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
from pydantic import ValidationError

from agent.v1 import agent_pb2 as pb
from conftest import run_events
from fake_tools import all_tools
from service.callers import Caller
from service.config import CallerConfig, Config, ModelConfig
from service.errors import InvalidRequest
from service.rpc.validate import Validator

CALLER = Caller("alice", CallerConfig(name="alice"), "none")


def validator(*allowed: str) -> Validator:
    return Validator(
        Config(model=ModelConfig(provider="scripted", allowed=list(allowed))), all_tools(), {}, "claude-default"
    )


def test_without_a_list_any_model_may_be_named() -> None:
    spec = validator().run_spec(pb.RunAgentRequest(message="hi", model="claude-anything"), "run_1", CALLER)
    assert spec.model == "claude-anything"


def test_a_listed_model_runs_and_an_unlisted_one_is_refused_naming_the_allowed() -> None:
    v = validator("claude-b", "claude-a")
    assert v.run_spec(pb.RunAgentRequest(message="hi", model="claude-a"), "run_1", CALLER).model == "claude-a"
    # naming none is the server's default, the operator's own choice
    assert v.run_spec(pb.RunAgentRequest(message="hi"), "run_2", CALLER).model == "claude-default"
    with pytest.raises(InvalidRequest) as refused:
        v.run_spec(pb.RunAgentRequest(message="hi", model="claude-opus-max"), "run_3", CALLER)
    assert str(refused.value) == (
        "model 'claude-opus-max' is not allowed on this server; allowed: claude-a, claude-b "
        "(leave it empty for the server's default, claude-default)"
    )
    assert refused.value.code == "INVALID_ARGUMENT"


def test_the_default_model_of_a_real_provider_must_be_on_the_list() -> None:
    for provider in ("anthropic", "auto"):  # auto: anthropic wherever ANTHROPIC_API_KEY is set
        with pytest.raises(ValidationError, match="model.name 'claude-sonnet-4-6' is not in model.allowed"):
            ModelConfig(provider=provider, allowed=["claude-a"])
    assert ModelConfig(provider="anthropic", name="claude-a", allowed=["claude-a"]).allowed == ["claude-a"]
    # the scripted model answers under its own name, never model.name
    assert ModelConfig(provider="scripted", allowed=["claude-a"]).allowed == ["claude-a"]


async def test_a_call_naming_an_unlisted_model_gets_invalid_argument(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(model={"provider": "scripted", "allowed": ["claude-a"]})
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await run_events(channel_to(svc), message="hi", model="claude-b")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "model 'claude-b' is not allowed on this server; allowed: claude-a" in (info.value.details() or "")
    events = await run_events(channel_to(svc), message="hi", model="claude-a")
    assert events[-1].HasField("final_response")
    # the offline model answers, and the run says so, whatever model the request named (an outside finding:
    # run_started said "claude-a" while the scripted model answered)
    assert events[0].run_started.model == svc.model.default_model and svc.model.default_model.startswith("scripted:")


def test_under_auto_the_default_must_be_listed_even_where_the_offline_model_would_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no key here, so auto would run the scripted model; but the same file runs Claude wherever the key is set (a
    # deployment whose secret comes later), where it could not start: it is refused where it is first tried, saying why
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    with pytest.raises(ValidationError) as refused:
        ModelConfig(allowed=["claude-a"])
    assert (
        "model.name 'claude-sonnet-4-6' is not in model.allowed: requests naming no model would use it wherever "
        "ANTHROPIC_API_KEY is set (provider auto); list it, name a listed one, or set provider: scripted"
    ) in str(refused.value)
    assert ModelConfig(provider="scripted", allowed=["claude-a"]).allowed == ["claude-a"]  # what the message offers
    with pytest.raises(ValidationError, match=r"would use it; list it or name a listed one \["):
        ModelConfig(provider="anthropic", allowed=["claude-a"])
