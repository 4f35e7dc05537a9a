"""Who may call: the callers, their credentials (hashes and certificate names) and their rights and limits."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from service.config.base import Section


class CallerConfig(Section):
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
    require_approval: list[str] = Field(
        default_factory=list, description="tools whose every call in this caller's runs waits for approval"
    )
    max_concurrent_runs: int | None = Field(
        default=None, ge=1, description="runs in progress at once; beyond it RESOURCE_EXHAUSTED; unset: no limit"
    )
    runs_per_minute: int | None = Field(
        default=None,
        ge=1,
        description="runs started in a sliding minute (refused requests do not count); beyond it RESOURCE_EXHAUSTED "
        "saying when to retry; unset: no limit",
    )
    admin: bool = Field(
        default=False, description="may list another caller's runs (ListRuns `caller`, GET /v1/runs?caller=)"
    )
    durability: Literal["durable", "not_durable"] | None = Field(
        default=None,
        description="this caller's runs when a request leaves `durability` unset: checkpointed (durable: they survive "
        "the crash of their process) or not; unset: durable only the runs that outlive their call (on_disconnect "
        "CONTINUE, SubmitRun)",
    )

    @model_validator(mode="after")
    def _hashes_are_hex(self) -> CallerConfig:
        for digest in self.token_sha256:
            if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest.lower()):
                raise ValueError(f"caller {self.name}: token_sha256 entries must be 64 hex characters")
        return self


class AuthConfig(Section):
    """`required`: every call but health must identify a configured caller. Off by default (an open dev server)."""

    required: bool = Field(
        default=False, description="refuse calls (UNAUTHENTICATED) that identify no configured caller"
    )
    callers: list[CallerConfig] = Field(default_factory=list, description="the callers this server knows")
    anonymous: CallerConfig = Field(
        default_factory=lambda: CallerConfig(name="anonymous"), description="rights of unauthenticated callers"
    )

    @field_validator("anonymous", mode="before")
    @classmethod
    def _anonymous_is_named(cls, value: Any) -> Any:
        """`auth.anonymous` given without a name is named "anonymous", as when it is not given (an outside finding:
        its name was required as soon as the section was, though its documented default is "anonymous")."""
        if isinstance(value, dict) and "name" not in value:
            return {"name": "anonymous", **value}
        return value

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
