"""Sections about the server process: what a request may ask for, keepalive, the garbage collector, TLS,
redaction, and the address check."""

from __future__ import annotations

import re
from pathlib import Path

from pydantic import Field, ValidationInfo, field_validator, model_validator

from service.config.base import Section


class Limits(Section):
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
        description=(
            "gRPC request headers (grpc metadata); a fixed cut-off, RESOURCE_EXHAUSTED above it; on the HTTP face, "
            "a request line and headers above it get 431"
        ),
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
    accept_ahead: int = Field(
        default=64,
        ge=0,
        le=1024,
        description="requests for new calls kept outstanding with grpc per AgentService method, beyond grpc's own "
        "one: under a burst of new calls the event loop takes up this many per turn rather than one "
        "(service/rpc/accept.py); 0 leaves grpc as it is",
    )
    first_events_first_s: float = Field(
        default=0.25,
        ge=0,
        le=5,
        description="on a saturated event loop, while a new RunAgent call has not sent its first event, streams "
        "already under way hold their next one, for at most this long: new calls start before old streams go on "
        "(service/rpc/firsts.py); 0 turns the hold off",
    )

    @model_validator(mode="after")
    def _default_within_max(self) -> Limits:
        if self.default_max_turns > self.max_turns:
            raise ValueError("default_max_turns must not exceed max_turns")
        return self


CREDENTIAL_FIELDS = ("authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key")


class Redaction(Section):
    """What is masked in logs, spans, audit and dead-letter records (never in what the model or the caller sees)."""

    fields: list[str] = Field(
        # credentials a tool input may carry (http_request's headers): kept out of the audit log and dead letters
        # unless an operator lists otherwise (an outside finding: a bearer token was stored as sent)
        default_factory=lambda: list(CREDENTIAL_FIELDS),
        description=(
            "keys whose values are masked anywhere in nested data (case-insensitive); the default masks credential "
            "headers, and a list given replaces it"
        ),
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


class KeepaliveConfig(Section):
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


class GcConfig(Section):
    """The cyclic garbage collector, tuned once the service has started. Each open stream keeps a few hundred live
    objects, so with the defaults (700, 10, 10) the collector rescans them all again and again: with thousands of
    runs open this doubled the CPU time of a run's start (docs/performance-log.md). A young generation of 100,000
    objects lets most of a run's objects die before any collection looks at them (a run lives about a second), and keeps
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


class TlsConfig(Section):
    """TLS on the gRPC port; with a client CA, mutual TLS (callers identified by their certificates)."""

    cert_file: Path = Field(description="the server's certificate chain (PEM)")
    key_file: Path = Field(description="the server's private key (PEM)")
    client_ca_file: Path | None = Field(default=None, description="enables client certificates (mutual TLS)")


class HttpConfig(Section):
    """The HTTP face (`http_listen`): JSON and Server-Sent Events over HTTP/1.1 (docs/http.md). It serves with
    `tls` when that is set, asking for a client certificate without requiring one (a browser has none; such a caller
    presents a bearer token instead)."""

    heartbeat_s: float = Field(
        default=15.0, gt=0, description="an SSE comment on a quiet stream this often, to keep proxies from closing it"
    )
    cors_origins: list[str] = Field(
        default_factory=list,
        description="origins a browser may call from (exact, e.g. https://ops.example.com); none: no CORS headers",
    )
    max_streams: int = Field(
        default=10_000, ge=1, description="open HTTP connections at most; past this, new requests get 503"
    )


# HOST:PORT, the host a name, an IPv4 address or a bracketed IPv6 one ([::]); empty for every interface (metrics).
_ADDRESS = re.compile(r"(?:\[[0-9A-Fa-f:.%\w-]+\]|[\w.-]*):(\d{1,5})")


def address(value: str | None, info: ValidationInfo) -> str | None:
    """Checked with the rest of the config: otherwise a bad address shows only when the server binds it, as a
    traceback (for metrics, after the gRPC port is taken)."""
    if value is None or (
        info.field_name not in ("metrics_listen", "http_listen") and value.startswith(("unix:", "unix-abstract:"))
    ):
        if value is not None and value.partition(":")[2] in ("", "//"):  # grpc would serve, on no socket one can find
            raise ValueError(f"{info.field_name} {value!r} names no socket: unix:PATH, e.g. unix:/run/agent.sock")
        return value  # grpc also serves on Unix domain sockets
    match = _ADDRESS.fullmatch(value)
    if match is None or int(match.group(1)) > 65535:
        raise ValueError(f"{info.field_name} must be HOST:PORT with a port from 0 to 65535, e.g. 0.0.0.0:50051")
    return value
