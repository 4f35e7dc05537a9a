"""Who is calling, and what they may do: caller identity from the client certificate (mutual TLS) or a bearer token,
checked once per call by a `grpc.aio` server interceptor, and per-caller rights (tools, concurrent runs, runs per
minute) that the servicer enforces.

The interceptor cannot see the TLS peer (interceptors get only the method name and metadata), so it wraps the
handler (`service.interceptors.wrap_handler`) and authenticates from the handler's `ServicerContext`. The caller is
handed to the servicer in a context variable: the wrapper and the handler run in the same task.
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
from pydantic import BaseModel, ConfigDict, Field, model_validator

from service.interceptors import Refusal, WrapCache, wrap_handler


class CallerConfig(BaseModel):
    """One caller: how it proves who it is, and what it may do."""

    model_config = ConfigDict(extra="forbid")
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


class TlsConfig(BaseModel):
    """TLS on the gRPC port; with a client CA, mutual TLS (callers identified by their certificates)."""

    model_config = ConfigDict(extra="forbid")
    cert_file: Path = Field(description="the server's certificate chain (PEM)")
    key_file: Path = Field(description="the server's private key (PEM)")
    client_ca_file: Path | None = Field(default=None, description="enables client certificates (mutual TLS)")


class AuthConfig(BaseModel):
    """`required`: every call but health must identify a configured caller. Off by default (an open dev server)."""

    model_config = ConfigDict(extra="forbid")
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


@dataclass(frozen=True)
class Caller:
    name: str
    config: CallerConfig
    via: str  # "mtls", "token" or "none"

    def may_use(self, tool: str) -> bool:
        return self.config.tools is None or tool in self.config.tools


_current: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("caller", default=None)


def current_caller(default: Caller | None = None) -> Caller | None:
    return _current.get() or default


class Unauthenticated(Exception):
    pass


class Authenticator:
    def __init__(self, config: AuthConfig) -> None:
        self.config = config
        self.anonymous = Caller(config.anonymous.name, config.anonymous, "none")
        self._by_identity = {ident: c for c in config.callers for ident in c.cert_identities}
        self._by_token = {digest.lower(): c for c in config.callers for digest in c.token_sha256}

    def identify(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller of this call: certificate first, then bearer token; anonymous unless auth is required."""
        auth = context.auth_context()
        # a certificate with SANs is named by them alone: its CN counts only when it has none (RFC 6125), or a CA
        # that checks the SANs it signs but not the CN would let any holder name itself after a configured caller
        names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or ()
        for value in names:
            caller = self._by_identity.get(value.decode(errors="replace"))
            if caller is not None:
                return Caller(caller.name, caller, "mtls")
        token = _bearer(context.invocation_metadata() or ())
        if token is not None:
            digest = hashlib.sha256(token.encode()).hexdigest()
            for known, caller in self._by_token.items():
                if hmac.compare_digest(known, digest):
                    return Caller(caller.name, caller, "token")
            raise Unauthenticated("the bearer token is not valid")
        if self.config.required:
            if names:
                presented = names[0].decode(errors="replace")
                raise Unauthenticated(f"the client certificate ({presented}) belongs to no configured caller")
            raise Unauthenticated("credentials required: a client certificate or an `authorization: Bearer` token")
        return self.anonymous


def _bearer(metadata: Sequence[tuple[str, Any]]) -> str | None:
    """The token of the call's `authorization: Bearer <token>`, None without the header. Anything else is refused:
    another scheme, no token, or more than one header (one of them may be a proxy's, and which cannot be told)."""
    header = None
    for key, value in metadata:
        if key == "authorization":
            if header is not None:
                raise Unauthenticated("more than one authorization header; send one: `Bearer <token>`")
            header = value
    if header is None:
        return None
    text = header.decode(errors="replace") if isinstance(header, bytes) else str(header)
    scheme, _, token = text.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("the authorization header must be `Bearer <token>`")
    return token


_OPEN_METHODS = ("/grpc.health.v1.Health/",)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates every call except health checks; UNAUTHENTICATED with a clear message otherwise."""

    def __init__(self, authenticator: Authenticator) -> None:
        self.authenticator = authenticator
        self._wrapped = WrapCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(_OPEN_METHODS):
            return handler
        return self._wrapped.get(details.method, handler, lambda: wrap_handler(handler, self._authenticate))

    def _authenticate(self, request: Any, context: grpc.aio.ServicerContext) -> Refusal | None:
        try:
            caller = self.authenticator.identify(context)
        except Unauthenticated as exc:
            return grpc.StatusCode.UNAUTHENTICATED, str(exc)
        _current.set(caller)
        return None


@dataclass
class CallerLimits:
    """Per-caller runs per minute (a sliding window) and concurrent runs. In-process: with several replicas the
    limits apply per replica until they move to a shared store.

    `admit` only checks; `started` counts a run once it exists, so a run refused after the check (the background
    queue is full, say) uses up none of the caller's runs per minute. The servicer calls both in one synchronous
    step, with no await between them, so no other start of the same caller can pass the check in between."""

    clock: Callable[[], float] = time.monotonic
    _starts: dict[str, deque[float]] = field(default_factory=dict)
    active: dict[str, int] = field(default_factory=dict)

    def admit(self, caller: Caller) -> str | None:
        """None when the caller may start a run now, else the reason it may not. Records nothing."""
        limit = caller.config.max_concurrent_runs
        if limit is not None and self.active.get(caller.name, 0) >= limit:
            return f"caller {caller.name} has {limit} runs in progress, its limit; wait for one to end"
        per_minute = caller.config.runs_per_minute
        if per_minute is not None:
            starts = self._last_minute(caller.name)
            if len(starts) >= per_minute:
                wait = math.ceil(60 - (self.clock() - starts[0]))  # rounded up: a retry on time is let in
                return (
                    f"caller {caller.name} started {per_minute} runs in the last minute, its limit; retry in {wait} s"
                )
        return None

    def started(self, caller: Caller) -> None:
        """A run of this caller was created (after `admit` let it through)."""
        self.active[caller.name] = self.active.get(caller.name, 0) + 1
        if caller.config.runs_per_minute is not None:
            self._last_minute(caller.name).append(self.clock())

    def ended(self, caller: Caller) -> None:
        self.active[caller.name] = max(0, self.active.get(caller.name, 0) - 1)

    def _last_minute(self, name: str) -> deque[float]:
        """The caller's starts of the last 60 s (older ones are dropped here)."""
        now = self.clock()
        starts = self._starts.setdefault(name, deque())
        while starts and now - starts[0] >= 60:
            starts.popleft()
        return starts


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """TLS; with a client CA, mutual TLS: grpc either requires and verifies a client certificate at the handshake or
    does not ask for one at all (no "request but verify" mode), so health checks for probes that carry no
    certificate are served on `health_listen`, a port of their own."""
    client_ca = tls.client_ca_file.read_bytes() if tls.client_ca_file else None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def token_hash(token: str) -> str:
    """What goes in `token_sha256` for a token (`python -m service.auth < token-file` prints it)."""
    return hashlib.sha256(token.encode()).hexdigest()


def main(argv: Sequence[str], stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """`python -m service.auth`: the hash of each token read from stdin, one a line. Never from arguments, which
    every user of the machine sees in `ps` and the shell keeps in its history."""
    if argv:
        print(
            "usage: python -m service.auth < token-file  (tokens on stdin, one a line; not as arguments, which "
            "other users see in ps and the shell keeps in its history)",
            file=stderr,
        )
        return 2
    for line in stdin:
        token = line.strip()  # as the server strips the header's token
        if token:
            print(token_hash(token), file=stdout)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:], sys.stdin, sys.stdout, sys.stderr))
