"""Completion push: where SubmitRun callbacks may point, and how long and how often their delivery is tried."""

from __future__ import annotations

from pydantic import Field, field_validator

from service.config.base import Section
from tools._addresses import networks


class PushConfig(Section):
    """Callbacks of background runs (docs/push.md). A callback URL must resolve to public addresses unless its
    network is in `allow_private`, the rule `tools.http_request` applies; checked at SubmitRun and at every send."""

    allow_private: list[str] = Field(
        default_factory=list,
        description="non-public networks (CIDR, e.g. 10.20.0.0/16) callback hosts may resolve to; empty: public only",
    )
    require_https: bool = Field(default=False, description="refuse http:// callback URLs")
    max_secret_bytes: int = Field(default=256, ge=16, description="longest callback secret")
    timeout_s: float = Field(default=10.0, gt=0, description="one delivery attempt, connect to answer")
    initial_backoff_s: float = Field(default=1.0, gt=0, description="wait after the first failed attempt")
    max_backoff_s: float = Field(default=600.0, gt=0, description="longest wait between attempts (jittered)")
    expire_s: float = Field(
        default=86400.0, gt=0, description="a delivery not acknowledged (2xx) this long after the run ended is dropped"
    )
    poll_s: float = Field(
        default=5.0, gt=0, description="how often a replica looks for due deliveries (its own are woken at once)"
    )

    @field_validator("allow_private")
    @classmethod
    def _networks(cls, entries: list[str]) -> list[str]:
        networks(entries, "push.allow_private")  # raises ValueError with the entry in the message
        return entries
