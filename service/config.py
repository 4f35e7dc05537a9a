"""Service configuration: a YAML file (optional) over defaults that need no file, then flags and environment.

Precedence, highest first: command-line flag, environment variable, YAML file, default.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Pacing(_Strict):
    """Scripted-model timing: delay before the first token and between tokens."""

    first_token_ms: float = Field(default=100.0, ge=0, description="delay before the first token of a turn")
    token_interval_ms: float = Field(default=20.0, ge=0, description="delay between tokens")


class ModelRetry(_Strict):
    """Retries of a model turn that failed before any of it reached the caller: exponential backoff with jitter,
    or the wait the API asks for (`retry-after`)."""

    attempts: int = Field(default=3, ge=1, le=10, description="tries per model turn, the first included")
    initial_backoff_s: float = Field(default=0.5, ge=0, description="first backoff, doubled on each retry")
    max_backoff_s: float = Field(default=8.0, ge=0, description="longest backoff between two tries")


class ModelConfig(_Strict):
    """The model: Claude through the anthropic SDK, or the offline scripted model."""

    provider: Literal["auto", "anthropic", "scripted"] = Field(
        default="auto", description="auto: anthropic when ANTHROPIC_API_KEY is set, else scripted"
    )
    name: str = Field(
        default="claude-sonnet-4-6", description="default model for the anthropic provider (requests may name another)"
    )
    max_tokens: int = Field(default=4096, ge=1, description="output tokens per turn unless the request says")
    timeout_s: float = Field(
        default=120.0, gt=0, description="HTTP timeout of a model request, per read (a keep-alive ping is a read)"
    )
    idle_timeout_s: float = Field(
        default=120.0,
        gt=0,
        description="a model turn with no content for this long fails, and is retried like a timeout (keep-alive "
        "pings do not count)",
    )
    turn_timeout_s: float = Field(
        default=1800.0,
        gt=0,
        description="a model turn, from its request to its last event, fails after this long (64,000 tokens at 40 a "
        "second take 27 minutes)",
    )
    thinking: Literal["adaptive"] | None = Field(
        default=None,
        description="adaptive: the model decides when and how much to think (Claude 4.6 and later; thinking blocks "
        "go back to it unchanged across tool turns)",
    )
    thinking_budget: int | None = Field(
        default=None,
        ge=1024,
        description="manual extended thinking with this budget, for models before 4.6 (deprecated on 4.6, refused by "
        "Opus 4.7); left off for a run whose max_tokens is not above it, which the API refuses; not with "
        "model.thinking",
    )
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = Field(
        default=None, description="output_config.effort; the model's default when unset"
    )
    scenario: Path | None = Field(
        default=None, description="scripted provider: scenario file (see service/models/scripted.py); the demo if unset"
    )
    pacing: Pacing | None = Field(default=None, description="scripted provider: overrides the scenario's pacing")
    retry: ModelRetry = ModelRetry()

    @model_validator(mode="after")
    def _one_kind_of_thinking(self) -> ModelConfig:
        if self.thinking is not None and self.thinking_budget is not None:
            raise ValueError("set model.thinking (adaptive) or model.thinking_budget (manual), not both")
        return self


class Limits(_Strict):
    """What one request may ask for; a request beyond a limit gets INVALID_ARGUMENT saying what to fix."""

    max_message_bytes: int = Field(default=100 * 1024, ge=1, description="largest message")
    default_max_turns: int = Field(default=10, ge=1, description="model turns of a run whose request sets none")
    max_turns: int = Field(default=50, ge=1, description="largest max_turns a request may ask for")
    max_tokens: int = Field(default=64000, ge=1, description="largest max_tokens a request may ask for")
    max_system_bytes: int = Field(default=100 * 1024, ge=1, description="largest system prompt")
    max_metadata_entries: int = Field(default=64, ge=0, description="most entries in a request's metadata")
    max_metadata_bytes: int = Field(default=16 * 1024, ge=0, description="total bytes of metadata keys and values")
    max_metadata_value_bytes: int = Field(default=1024, ge=0, description="longest metadata key or value")
    max_idempotency_key_bytes: int = Field(default=256, ge=1, description="longest idempotency_key")
    max_model_bytes: int = Field(default=256, ge=1, description="longest model id a request may name")
    max_header_bytes: int = Field(
        default=16 * 1024,
        ge=1024,
        description="gRPC request headers (grpc metadata); a fixed cut-off, RESOURCE_EXHAUSTED above it",
    )
    max_receive_bytes: int = Field(
        default=4 * 1024 * 1024, ge=1024, description="gRPC receive limit: a larger request gets RESOURCE_EXHAUSTED"
    )
    tool_timeout_s: float = Field(default=30.0, gt=0, description="hard timeout of one tool call")
    max_pending_rpcs: int = Field(
        default=15_000,
        ge=3,
        description="calls received but not yet taken up by the event loop that grpc keeps waiting; past a third "
        "of this it cancels new ones at random, past all of it every new one (grpc's own default is 3,000)",
    )
    max_pending_s: int = Field(
        default=60, ge=1, description="a call not taken up within this many seconds is cancelled (grpc's default: 30)"
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Limits:
        if self.default_max_turns > self.max_turns:
            raise ValueError("default_max_turns must not exceed max_turns")
        return self


class StoreConfig(_Strict):
    """Where a durable store lives: `sqlite:///PATH` (relative paths under the working directory); unset means
    `<data_dir>/<default file>`. A URL so that a shared backend (PostgreSQL) can be chosen here later."""

    url: str | None = Field(default=None, description="sqlite:///PATH; unset: the default file under data_dir")
    queue_size: int = Field(
        default=10000,
        ge=1,
        description="records buffered for the audit log's background writer; when it falls that far behind, a "
        "finishing tool call waits for it (the event loop does not, and no record is dropped); unused by dead_letter",
    )


class AuditConfig(StoreConfig):
    """The audit log's store, the keys that sign its rows (docs/audit.md) and how often its head is logged."""

    key_file: Path | None = Field(
        default=None,
        description="file of ID:SECRET keys, the last one signing new rows; AGENT_AUDIT_KEY overrides it; unset: "
        "audit.key beside the database, generated on the first start",
    )
    head_log_interval_s: float | None = Field(
        default=300.0, gt=0, description="log the chain's head this often when it moved (also at start and close)"
    )


class DeadLetterConfig(StoreConfig):
    """The dead-letter store: tool calls that finally failed, with input, error and traceback."""

    retention_days: float | None = Field(
        default=30.0, gt=0, description="dead letters older than this are deleted (at start, then hourly); null: kept"
    )


class RunsConfig(_Strict):
    """Run lifecycle: retention, background queue, coalescing and slow-subscriber limits."""

    retention_s: float = Field(default=900.0, gt=0, description="how long an ended run stays watchable")
    max_retained_runs: int = Field(default=10_000, ge=1, description="how many ended runs stay watchable")
    max_retained_bytes: int = Field(
        default=256 * 2**20,
        ge=2**20,
        description="ended runs' logs (tool data as JSON, text, ~200 bytes an event) past this total: the oldest "
        "ended runs are forgotten first",
    )
    max_event_data_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=512 * 1024,
        description="tool data whose JSON text is larger goes in tool_data_part events of at most this many bytes "
        "(as a protobuf Value, data can take 5 times its JSON size: this keeps every event under 3 MiB)",
    )
    max_events_per_run: int = Field(default=100_000, ge=10, description="largest event log of one run")
    max_run_s: float = Field(default=3600.0, gt=0, description="longest a run may take, whatever the deadline")
    min_tool_budget_s: float = Field(default=0.05, ge=0, description="no tool call starts with less time left")
    deadline_margin_s: float = Field(
        default=0.05,
        ge=0,
        description="the run ends this much before the deadline, plus the rounding of the caller's timeout on the wire",
    )
    background_max_concurrent: int = Field(default=8, ge=1, description="SubmitRun runs running at once")
    background_max_queued: int = Field(
        default=100, ge=0, description="SubmitRun runs waiting; beyond it RESOURCE_EXHAUSTED"
    )
    coalesce_window_s: float = Field(default=0.01, ge=0, description="text deltas this close together are merged")
    coalesce_max_window_s: float = Field(
        default=0.1,
        ge=0,
        description="as the event loop nears saturation the window widens, up to this (never below the window)",
    )
    coalesce_max_bytes: int = Field(default=1024, ge=1, description="largest merged text delta")
    subscriber_coalesce_lag: int = Field(default=64, ge=1, description="a stream this far behind gets merged deltas")
    subscriber_max_lag: int = Field(default=10_000, ge=1, description="a stream this far behind is dropped")
    max_tool_calls: int = Field(default=200, ge=1, description="largest max_tool_calls a request may ask for")
    max_output_tokens: int = Field(default=1_000_000, ge=1, description="largest max_output_tokens")


class Redaction(_Strict):
    """What is masked in logs, spans, audit and dead-letter records (never in what the model or the caller sees)."""

    fields: list[str] = Field(
        default_factory=list, description="keys whose values are masked anywhere in nested data (case-insensitive)"
    )
    patterns: list[str] = Field(default_factory=list, description="regular expressions masked inside strings")
    mask: str = Field(default="[REDACTED]", description="what a masked value is replaced by")

    @field_validator("patterns")
    @classmethod
    def _compile(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"bad redaction pattern {pattern!r}: {exc}") from exc
        return patterns


class KeepaliveConfig(_Strict):
    """HTTP/2 keepalive on the gRPC port. A stream here can stay quiet for minutes (a queued run, a long tool call, a
    slow first token) and callers ping to keep such connections open through proxies and NATs; with grpc's server
    defaults a ping more often than every 5 minutes on a quiet connection counts as abuse, and the second one closes
    the connection (GOAWAY "too many pings"), failing every stream on it with UNAVAILABLE."""

    time_s: float = Field(
        default=60.0, gt=0, description="ping a quiet connection this often, to find callers that vanished"
    )
    timeout_s: float = Field(
        default=20.0, gt=0, description="close a connection whose ping is not answered within this (its runs stop)"
    )
    min_client_ping_interval_s: float = Field(
        default=10.0, ge=0, description="callers may ping a quiet connection this often (grpc's default: 300)"
    )
    permit_without_calls: bool = Field(
        default=True, description="accept pings on a connection with no call open (grpc's default: no)"
    )


class GcConfig(_Strict):
    """The cyclic garbage collector, tuned once the service has started. Each open stream keeps a few hundred live
    objects, so with the defaults (700, 10, 10) the collector rescans them all again and again: with thousands of
    runs open this doubled the CPU time of a run's start (docs/performance.md). A young generation of 100,000 objects
    lets most of a run's objects die before any collection looks at them (a run lives about a second), and keeps
    collections out of a burst of new calls: the first-event p99 at C=100 fell by 11-22 % against 10,000, for a
    pause of about 3 ms per young collection instead of 0.2 ms, ten times rarer."""

    freeze: bool = Field(default=True, description="move everything allocated at start-up out of the collector's way")
    thresholds: tuple[int, int, int] = Field(
        default=(100_000, 50, 100), description="gc.set_threshold(gen0, gen1, gen2); Python's default is 700, 10, 10"
    )

    @field_validator("thresholds")
    @classmethod
    def _positive_gen0(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if value[0] < 1 or min(value) < 0:
            raise ValueError("gen0 must be at least 1 and no threshold negative")
        return value


class CallerConfig(_Strict):
    """One caller: how it proves who it is, and what it may do."""

    name: str = Field(
        min_length=1, description="runs, idempotency keys and limits are kept by it; written into run metadata"
    )
    cert_identities: list[str] = Field(
        default_factory=list,
        description="client certificate SANs (DNS, URI, IP) that identify this caller; a CN only counts in a "
        "certificate without SANs",
    )
    token_sha256: list[str] = Field(
        default_factory=list, description="hex SHA-256 of bearer tokens (never the tokens themselves)"
    )
    tools: list[str] | None = Field(default=None, description="tools this caller may use; all when unset")
    max_concurrent_runs: int | None = Field(
        default=None, ge=1, description="runs in progress at once; beyond it RESOURCE_EXHAUSTED; unset: no limit"
    )
    runs_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="runs started in a sliding minute (refused requests do not count); beyond it RESOURCE_EXHAUSTED "
        "saying when to retry; unset: no limit",
    )

    @model_validator(mode="after")
    def _hashes_are_hex(self) -> CallerConfig:
        for digest in self.token_sha256:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"caller {self.name}: token_sha256 entries must be 64 hex characters")
        return self


class TlsConfig(_Strict):
    """TLS on the gRPC port; with a client CA, mutual TLS (callers identified by their certificates)."""

    cert_file: Path = Field(description="the server's certificate chain (PEM)")
    key_file: Path = Field(description="the server's private key (PEM)")
    client_ca_file: Path | None = Field(default=None, description="enables client certificates (mutual TLS)")


class AuthConfig(_Strict):
    """`required`: every call but health must identify a configured caller. Off by default (an open dev server)."""

    required: bool = Field(
        default=False, description="refuse calls (UNAUTHENTICATED) that identify no configured caller"
    )
    callers: list[CallerConfig] = Field(default_factory=list, description="the callers this server knows")
    anonymous: CallerConfig = Field(
        default_factory=lambda: CallerConfig(name="anonymous"), description="rights of unauthenticated callers"
    )

    @model_validator(mode="after")
    def _callers_are_told_apart(self) -> AuthConfig:
        """A caller is its name (runs, idempotency keys and limits are kept by name) and its credentials: two callers
        must share neither, nor may a caller share the anonymous callers' name."""
        names = [c.name for c in self.callers]
        if len(set(names)) != len(names):
            raise ValueError("auth.callers: caller names must be unique")
        if self.anonymous.name in names:
            raise ValueError(
                f"auth.callers: {self.anonymous.name!r} is the anonymous callers' name (auth.anonymous.name); "
                "unauthenticated calls would see its runs: name one of them otherwise"
            )
        if self.anonymous.cert_identities or self.anonymous.token_sha256:
            raise ValueError("auth.anonymous: anonymous callers present no credentials; give them to a caller")
        owners: dict[str, str] = {}
        for caller in self.callers:
            for credential in [*caller.cert_identities, *(d.lower() for d in caller.token_sha256)]:
                other = owners.setdefault(credential, caller.name)
                if other != caller.name:
                    shown = credential if credential in caller.cert_identities else f"token {credential[:8]}…"
                    raise ValueError(f"auth.callers: {shown} identifies both {other} and {caller.name}")
        return self


# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 one ([::]); empty for every interface (metrics).
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.%\w-]+\]|[\w.-]*):(\d{1,5})")


def _address(value: str | None, info: ValidationInfo) -> str | None:
    """Checked with the rest of the config: otherwise a bad address shows only when the server binds it, as a
    traceback (for metrics, after the gRPC port is taken)."""
    if value is None or (info.field_name != "metrics_listen" and value.startswith(("unix:", "unix-abstract:"))):
        return value  # grpc also serves on Unix domain sockets
    match = _ADDRESS.fullmatch(value)
    if match is None or int(match.group(1)) > 65535:
        raise ValueError(f"{info.field_name} must be HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:50051")
    return value


class Config(_Strict):
    """The whole configuration. Defaults need no file."""

    listen: str = Field(default="0.0.0.0:50051", description="gRPC address HOST:PORT (or unix:PATH)")
    metrics_listen: str = Field(default="0.0.0.0:9464", description="Prometheus /metrics address HOST:PORT")
    data_dir: Path = Field(
        default=Path("var"), description="demo database, search index, audit log and dead letters (made 0700)"
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
    health_listen: str | None = Field(
        default=None, description="extra plaintext port serving only grpc.health.v1 (probes without credentials)"
    )
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
    redaction: Redaction = Redaction()
    gc: GcConfig = GcConfig()

    _addresses = field_validator("listen", "metrics_listen", "health_listen")(_address)

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
    "data_dir": "AGENT_DATA_DIR",
}


class ConfigError(Exception):
    """The configuration file is missing, not YAML, or does not fit the schema."""


def load_config(path: Path | None = None, **overrides: Any) -> Config:
    """Read `path` (if given), apply environment variables, then non-None `overrides` (from flags)."""
    raw: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config {path} must be a YAML mapping, not {type(loaded).__name__}")
        raw.update(loaded)
    for key, var in ENV_VARS.items():
        if os.environ.get(var):
            raw[key] = os.environ[var]
    raw.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"invalid config: {exc}") from exc
