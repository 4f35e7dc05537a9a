"""Service configuration: a YAML file (optional) over defaults that need no file, then flags and environment.

Precedence, highest first: command-line flag, environment variable, YAML file, default.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from service.config.approvals import ApprovalsConfig
from service.config.base import Section
from service.config.callers import AuthConfig, CallerConfig
from service.config.model import ModelConfig, ModelRetry, Pacing
from service.config.push import PushConfig
from service.config.server import GcConfig, HttpConfig, KeepaliveConfig, Limits, Redaction, TlsConfig, address
from service.config.stores import (
    AuditConfig,
    DeadLetterConfig,
    DurableConfig,
    RecordsConfig,
    RunsConfig,
    StateConfig,
    StoreConfig,
)

__all__ = [
    "ApprovalsConfig",
    "AuditConfig",
    "AuthConfig",
    "CallerConfig",
    "Config",
    "ConfigError",
    "DeadLetterConfig",
    "DurableConfig",
    "ENV_VARS",
    "GcConfig",
    "HttpConfig",
    "KeepaliveConfig",
    "Limits",
    "ModelConfig",
    "ModelRetry",
    "Pacing",
    "PushConfig",
    "RecordsConfig",
    "Redaction",
    "RunsConfig",
    "StateConfig",
    "StoreConfig",
    "TlsConfig",
    "load_config",
]


class Config(Section):
    """The whole configuration. Defaults need no file."""

    listen: str = Field(default="0.0.0.0:50051", description="gRPC address HOST:PORT (or unix:PATH)")
    metrics_listen: str = Field(default="0.0.0.0:9464", description="Prometheus /metrics address HOST:PORT")
    data_dir: Path = Field(
        default=Path("var"),
        description=(
            "demo database, search index, audit log and dead letters (made 0700); unset, where the working folder "
            "cannot be written (or is /, whose var is the system's): $XDG_STATE_HOME/agent-service, else "
            "~/.local/state/agent-service"
        ),
    )
    system_prompt: str = Field(
        default=(
            "You are an operations assistant for a logistics back office. Use the tools to look up facts; "
            "say which tool each fact came from; be brief."
        ),
        description="system prompt of a request that sends none",
    )
    shutdown_grace_s: float = Field(
        default=20.0, ge=0, description="on SIGTERM, how long in-flight runs may finish before they are stopped"
    )
    reflection: bool = Field(default=True, description="gRPC server reflection (grpcurl needs no proto files)")
    tls: TlsConfig | None = Field(default=None, description="TLS on `listen`; with client_ca_file, mutual TLS")
    auth: AuthConfig = AuthConfig()
    approvals: ApprovalsConfig = ApprovalsConfig()
    health_listen: str | None = Field(
        default=None, description="extra plaintext port serving only grpc.health.v1 (probes without credentials)"
    )
    http_listen: str | None = Field(
        default=None, description="HTTP address HOST:PORT of the JSON and Server-Sent Events face; off when unset"
    )
    http: HttpConfig = HttpConfig()
    model: ModelConfig = ModelConfig()
    limits: Limits = Limits()
    keepalive: KeepaliveConfig = KeepaliveConfig()
    runs: RunsConfig = RunsConfig()
    tools: dict[str, dict[str, Any]] = Field(default_factory=dict, description="per-tool options by tool name")
    tool_modules: list[str] = Field(
        default_factory=list, description="extra Python modules that define create(config) -> Tool"
    )
    policies: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="per-tool policy overrides by tool name (tools.policy.ToolPolicy fields)"
    )
    audit: AuditConfig = AuditConfig()
    dead_letter: DeadLetterConfig = DeadLetterConfig()
    state: StateConfig = StateConfig()
    records: RecordsConfig = RecordsConfig()
    durable: DurableConfig = DurableConfig()
    push: PushConfig = PushConfig()
    workers: int = Field(
        default=1,
        ge=1,
        le=256,
        description="server processes sharing the port (SO_REUSEPORT); above 1 needs a shared state.url",
    )
    redaction: Redaction = Redaction()
    gc: GcConfig = GcConfig()

    addresses = field_validator("listen", "metrics_listen", "health_listen", "http_listen")(address)

    @model_validator(mode="after")
    def _certificates_need_mutual_tls(self) -> Config:
        if self.tls is None or self.tls.client_ca_file is None:
            for caller in self.auth.callers:
                if caller.cert_identities:
                    raise ValueError(
                        f"auth.callers {caller.name}: cert_identities need tls.client_ca_file (mutual TLS); without "
                        "it no call carries a client certificate, and the caller is never identified by one"
                    )
        return self


ENV_VARS = {
    "listen": "AGENT_LISTEN",
    "metrics_listen": "AGENT_METRICS_LISTEN",
    "http_listen": "AGENT_HTTP_LISTEN",
    "data_dir": "AGENT_DATA_DIR",
    "workers": "AGENT_WORKERS",
    "state.url": "AGENT_STATE_URL",  # from a Secret on Kubernetes: the URL may carry a password
    "records.url": "AGENT_RECORDS_URL",
    "durable.executor_id": "AGENT_EXECUTOR_ID",
}


class ConfigError(Exception):
    """The configuration file is missing, not YAML, or does not fit the schema."""


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Read `path` (if given), apply environment variables, then non-None `overrides` (from flags)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"cannot read config {path}: {_yaml_problem(exc)}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, not {type(loaded).__name__}")
        raw.update(loaded)
    for key, var in ENV_VARS.items():
        if os.environ.get(var):
            section, _, name = key.rpartition(".")
            target = raw
            if section:  # a key inside a section: the file's section, keeping its other keys
                found = raw.get(section)
                target = raw[section] = dict(found) if isinstance(found, dict) else {}
            target[name] = os.environ[var]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    raw.setdefault("data_dir", default_data_dir())
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {_one_line(exc)}") from exc


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML error on one line, with where it is: PyYAML's own text quotes the file over several lines."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else problem


def _one_line(exc: ValidationError) -> str:
    """Each problem as `where: what (got …)` on one line: pydantic's own text runs over several lines and ends each
    with a link to its docs, where the README promises one `error: …` line (an outside finding)."""
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "config"
        got = f" (got {error['input']!r:.60})" if "input" in error and not isinstance(error["input"], dict) else ""
        parts.append(f"{where}: {error['msg']}{got}")
    return "; ".join(parts)


def default_data_dir() -> Path:
    """The data folder when nothing names one: `var` in the working folder, as `make run` in a checkout has it. Where
    that cannot be made or written (a shared folder, a read-only one) or the working folder is `/` (a service
    manager's default, where `var` is the system's /var), the user's state folder: the offline demo starts wherever
    it is run from."""
    here = Path("var")
    try:
        cwd = Path.cwd()
        if cwd != Path(cwd.anchor) and os.access(here if here.exists() else cwd, os.W_OK | os.X_OK):
            return here
        return Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "agent-service"
    except (OSError, RuntimeError):  # the working folder was removed; no home to find
        return here
