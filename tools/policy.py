"""What a tool declares about how it should be called: timeout, retries, breaker, rate limit, cache, dependencies,
fallback, and what its calls change (`side_effects`). Plain data only: the executor (`service/executor.py`) enforces
it, and `policies.<tool>` in the YAML config overrides any field of it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

# What a call may change, and so whether it is safe to repeat (after a crash cut it off, say):
#   none        it reads only: a repeat changes nothing (its answer may differ, the world does not). May be cached.
#   idempotent  it changes something, but a repeat with the same idempotency key (`tools.base.CallInfo`) changes
#               nothing more: the upstream deduplicates, or the change is a "set to" rather than an "add". Safe to
#               repeat, never cached (each call must reach the upstream).
#   unsafe      a repeat may do it twice (send the e-mail again, book the payment twice). Never repeated unasked.
SideEffects = Literal["none", "idempotent", "unsafe"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeoutPolicy(_Strict):
    """The time one attempt may take."""

    seconds: float | None = Field(default=None, gt=0, description="per attempt; unset: limits.tool_timeout_s")
    mode: Literal["hard", "soft"] = Field(
        default="hard", description="hard: cancel, status timeout; soft: a streaming tool's chunks so far, partial"
    )


class RetryPolicy(_Strict):
    """Retries of timeouts and `ToolError(retryable=True)`: exponential backoff with jitter; never after chunks went
    out, into an open circuit, or past the run's deadline."""

    attempts: int = Field(default=1, ge=1, le=10, description="tries per call, the first included; 1: no retry")
    initial_backoff_s: float = Field(default=0.2, ge=0, description="exponential backoff multiplier")
    max_backoff_s: float = Field(default=5.0, ge=0, description="longest backoff (jitter stays on there)")
    on_timeout: bool = Field(default=True, description="retry a hard timeout as a transient failure")


class BreakerPolicy(_Strict):
    """The circuit breaker: open, calls fail fast with CIRCUIT_OPEN (or go to the fallback); half-open, one trial
    call whose result alone closes or reopens it."""

    failure_threshold: int = Field(default=5, ge=1, description="consecutive failures that open the circuit")
    failure_rate: float = Field(default=0.5, gt=0, le=1, description="or this failure rate over the window")
    window_s: float = Field(default=60.0, gt=0, description="the window of the failure rate")
    min_calls: int = Field(default=10, ge=1, description="calls in the window before the rate counts")
    cooldown_s: float = Field(default=30.0, ge=0, description="open this long, then half-open: one trial call")
    scope: Literal["fleet", "process"] = Field(
        default="fleet",
        description="fleet: one breaker for every replica and worker sharing state.url (redis://), as the upstream "
        "they call is one; process: this process's own, for failures local to it; on memory:// both are the process's",
    )


class RateLimitPolicy(_Strict):
    """A token bucket per tool: a call over the rate waits its turn or is refused with RATE_LIMITED. With a shared
    state.url (redis://) the bucket is the fleet's: the rate holds for all replicas and workers together."""

    rate_per_s: float = Field(gt=0, description="sustained calls per second")
    burst: int = Field(default=1, ge=1, description="calls allowed at once above the sustained rate")
    mode: Literal["wait", "reject"] = Field(
        default="wait", description="wait: in turn, refused at once when the turn would come after max_wait_s"
    )
    max_wait_s: float = Field(default=1.0, ge=0, description="wait mode: wait at most this long, then reject")


class CachePolicy(_Strict):
    """Results of a tool without side effects, per input (canonical JSON); the fleet's with state.shared_cache."""

    ttl_s: float = Field(gt=0, description="how long a result is served from the cache")
    max_entries: int = Field(
        default=1024,
        ge=1,
        description="inputs kept in a process; the least recently used go first (shared: only the TTL bounds them)",
    )


class ToolPolicy(_Strict):
    """A tool's policy. The defaults suit a tool nobody has thought about: a hard timeout, no retries, a breaker."""

    timeout: TimeoutPolicy = TimeoutPolicy()
    retry: RetryPolicy = RetryPolicy()
    breaker: BreakerPolicy | None = Field(default=BreakerPolicy(), description="null: no breaker")
    rate_limit: RateLimitPolicy | None = Field(default=None, description="null: no rate limit")
    cache: CachePolicy | None = Field(default=None, description="null: no cache")
    side_effects: SideEffects = Field(
        default="unsafe",
        description="none: reads only (may be cached); idempotent: a repeat with the same idempotency key changes "
        "nothing more; unsafe: a repeat may do it twice. none and idempotent calls are safe to repeat",
    )
    requires: tuple[str, ...] = Field(default=(), description="tools that must have succeeded earlier in the run")
    fallback: str | None = Field(default=None, description="tool called with the same input when this one fails")
    slow_s: float | None = Field(default=None, gt=0, description="log a warning when a call takes longer")

    @model_validator(mode="before")
    @classmethod
    def _idempotent_is_side_effects_none(cls, data: Any) -> Any:
        """`idempotent: true` is the old spelling of `side_effects: none` (same input, same answer, no side effect:
        may be cached), still read so that configs and tool modules written for it keep working."""
        if isinstance(data, dict) and "idempotent" in data:
            data = dict(data)
            flag = data.pop("idempotent")
            if not isinstance(flag, bool):
                raise ValueError("idempotent (the old spelling of side_effects: none) must be true or false")
            data["side_effects"] = "none" if flag else "unsafe"
        return data

    @model_validator(mode="after")
    def _cache_needs_no_side_effects(self) -> ToolPolicy:
        if self.cache is not None and self.side_effects != "none":
            raise ValueError("cache is only allowed on a tool without side effects (set side_effects: none)")
        return self
