"""The composition root: every part of the service is built here, from the config, and handed what it needs. No other
module builds its siblings; follow `start` to see the whole service.

    tools ─┐
    model ─┼─ executor (policies, audit, dead letters, redaction) ─ loop ─ registry ─┐
           │                                                                         ├─ servicer ─ gRPC server
    config ┴─ authenticator, caller limits ──────────────────────────────────────────┘
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from service import redact, telemetry
from service.callers import CallerLimits
from service.config import Config
from service.executor import Executor
from service.loop import AgentLoop
from service.models.base import Model
from service.models.scripted import Scenario, ScriptedModel
from service.policy.config import resolve
from service.policy.shared import Reachability, SharedPolicy
from service.records.audit import DEFAULT_FILE as AUDIT_FILE
from service.records.audit import AuditLog
from service.records.audit_chain import load_keyring
from service.records.deadletter import DEFAULT_FILE as DEAD_LETTER_FILE
from service.records.deadletter import DeadLetterStore
from service.records.sqlite import sqlite_path
from service.redact import Redactor
from service.rpc.auth import Authenticator, AuthInterceptor
from service.rpc.interceptors import RejectUndecodable, tracing_interceptors
from service.rpc.server import Service, start_server
from service.rpc.servicer import AgentServicer
from service.runs import RunRegistry
from tools import load_tools
from tools.base import Tool

log = logging.getLogger(__name__)


async def start(
    config: Config,
    *,
    metrics: bool = True,
    tools: dict[str, Tool[Any]] | None = None,
    model: Model | None = None,
) -> Service:
    """Build the service from `config` and start serving. `tools` and `model` replace the ones the config describes
    (tests pass their own)."""
    tools = build_tools(config) if tools is None else tools
    warn_unavailable(tools)
    model = build_model(config) if model is None else model
    telemetry.setup_tracing()  # only when the OTEL_* environment asks for it; a no-op tracer otherwise
    executor = build_executor(tools, config)
    loop = AgentLoop(model, executor, retry=config.model.retry)
    registry = RunRegistry(loop, config.runs)
    authenticator = Authenticator(config.auth)
    servicer = AgentServicer(
        registry,
        tools,
        config,
        anonymous=authenticator.anonymous,
        caller_limits=CallerLimits(),
        tool_specs=loop.tool_specs,
        default_model=model.default_model,
    )
    return await start_server(
        config,
        servicer,
        interceptors=[AuthInterceptor(authenticator), RejectUndecodable(), *tracing_interceptors()],
        registry=registry,
        model=model,
        executor=executor,
        tools=tools,
        metrics=metrics,
    )


def build_model(config: Config) -> Model:
    """Claude when configured (or when auto and ANTHROPIC_API_KEY is set), else the offline scripted model."""
    provider = config.model.provider
    if provider == "auto":
        provider = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "scripted"
    if provider == "anthropic":
        from service.models.anthropic import AnthropicModel

        return AnthropicModel(
            default_model=config.model.name,
            timeout_s=config.model.timeout_s,
            idle_timeout_s=config.model.idle_timeout_s,
            turn_timeout_s=config.model.turn_timeout_s,
            thinking_budget=config.model.thinking_budget,
            adaptive_thinking=config.model.thinking == "adaptive",
            effort=config.model.effort,
        )
    scenario = Scenario.from_file(config.model.scenario) if config.model.scenario else Scenario.demo()
    return ScriptedModel(scenario, pacing=config.model.pacing)


def build_tools(config: Config) -> dict[str, Tool[Any]]:
    # Private to the service when made here (0700): it holds the audit log and the dead letters. A folder that is
    # already there keeps its mode (a volume's is the platform's); the databases in it are 0600 (records/sqlite.py).
    config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    return load_tools(config.data_dir, config.tools, extra_modules=config.tool_modules)


def warn_unavailable(tools: Mapping[str, Tool[Any]]) -> None:
    for name, tool in tools.items():
        if tool.unavailable:
            log.warning(
                "tool %s is unavailable on this server and left out of ListTools: %s",
                name,
                tool.unavailable,
                extra={"tool": name},
            )


def build_executor(tools: Mapping[str, Tool[Any]], config: Config) -> Executor:
    """The executor a server runs: policies resolved from the tools and `policies`, durable audit and dead-letter
    stores where the config says (by default under data_dir), and the config's redaction, installed process-wide."""
    policies = resolve(tools, config.policies)
    audit_path = sqlite_path(config.audit, config.data_dir, AUDIT_FILE)
    dead_path = sqlite_path(config.dead_letter, config.data_dir, DEAD_LETTER_FILE)
    redactor = Redactor.from_config(config.redaction)
    redact.install(redactor)  # logging is process-wide: the JSON log formatter masks with the same redactor
    return Executor(
        tools,
        timeout_s=config.limits.tool_timeout_s,
        policies=policies,
        audit=AuditLog(
            audit_path,
            keyring=load_keyring(config.audit.key_file, audit_path),
            queue_size=config.audit.queue_size,
            head_log_interval_s=config.audit.head_log_interval_s,
            redactor=redactor,
        ),
        dead_letter=DeadLetterStore(
            dead_path,
            redactor=redactor,
            retention_s=None
            if config.dead_letter.retention_days is None
            else config.dead_letter.retention_days * 86400,
        ),
        redactor=redactor,
        shared=build_shared_policy(config),
    )


def build_shared_policy(config: Config) -> SharedPolicy | None:
    """Rate limits, fleet breakers and (with `state.shared_cache`) result caches on the shared state, when
    `state.url` names one; None on memory:// (each process its own, as before)."""
    if not config.state.shared:
        return None
    # imported here: the embedded default never loads the Redis client (nor needs what it needs, e.g. async_timeout
    # on a Python before 3.11.3)
    from service.state.redis_limits import RedisPolicyState, client

    state = RedisPolicyState(client(config.state), config.state.prefix)
    return SharedPolicy(state, Reachability("limits", state.ping), cache=config.state.shared_cache)
