"""The model section: which provider, its limits and timeouts, thinking, retries, and the scripted model's pacing."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from service.config.base import Section


class Pacing(Section):
    """Scripted-model timing: delay before the first token and between tokens."""

    first_token_ms: float = Field(default=100.0, ge=0, description="delay before the first token of a turn")
    token_interval_ms: float = Field(default=20.0, ge=0, description="delay between tokens")


class ModelRetry(Section):
    """Retries of a model turn that failed before any of it reached the caller: exponential backoff with jitter,
    or the wait the API asks for (`retry-after`)."""

    attempts: int = Field(default=3, ge=1, le=10, description="tries per model turn, the first included")
    initial_backoff_s: float = Field(default=0.5, ge=0, description="first backoff, doubled on each retry")
    max_backoff_s: float = Field(default=8.0, ge=0, description="longest backoff between two tries")


class ModelConfig(Section):
    """The model: Claude through the anthropic SDK, or the offline scripted model."""

    provider: Literal["auto", "anthropic", "scripted"] = Field(
        default="auto",
        description=(
            "auto: anthropic when ANTHROPIC_API_KEY is set, else scripted (the offline model answers every request "
            "as scripted:<scenario>, whatever model it names; the name is still checked against model.allowed)"
        ),
    )
    name: str = Field(
        default="claude-sonnet-4-6",
        description="default model for the anthropic provider (requests may name another, from model.allowed if set)",
    )
    allowed: list[str] = Field(
        default_factory=list,
        description="the model ids a request may name; empty: any. A request naming another gets INVALID_ARGUMENT "
        "listing these; one that names none gets model.name, which must then be listed",
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

    @model_validator(mode="after")
    def _default_is_allowed(self) -> ModelConfig:
        # The scripted model answers under its own name (scripted:<scenario>), never model.name. Under auto the check
        # holds even with no ANTHROPIC_API_KEY here: the file is the same where the key is set (a deployment whose
        # secret arrives later), and there it would fail to start; so it fails wherever it is first tried.
        if self.allowed and self.provider != "scripted" and self.name not in self.allowed:
            why = f"model.name {self.name!r} is not in model.allowed: requests naming no model would use it"
            if self.provider == "auto":
                raise ValueError(
                    f"{why} wherever ANTHROPIC_API_KEY is set (provider auto); list it, name a listed one, or set "
                    "provider: scripted"
                )
            raise ValueError(f"{why}; list it or name a listed one")
        return self
