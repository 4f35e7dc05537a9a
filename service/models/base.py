"""The Model protocol: one streamed model turn in, model events out.

Conversation history uses the Anthropic Messages shape (`{"role": ..., "content": [blocks]}` with `text`,
`thinking`, `tool_use` and `tool_result` blocks) because it is the richest of the shapes we speak; other adapters
translate from it.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """A tool as the model sees it."""

    name: str
    description: str
    input_schema: dict[str, Any]


@dataclass(frozen=True, kw_only=True)
class TurnRequest:
    model: str
    system: str | None
    messages: Sequence[dict[str, Any]]
    tools: Sequence[ToolSpec]
    max_tokens: int


# What a model turn streams. `index` is the content block's position in the turn.


@dataclass(frozen=True, kw_only=True)
class ThinkingDelta:
    text: str


@dataclass(frozen=True, kw_only=True)
class TextDelta:
    text: str


@dataclass(frozen=True, kw_only=True)
class ToolUseStart:
    call_id: str
    name: str


@dataclass(frozen=True, kw_only=True)
class ToolUseDelta:
    call_id: str
    partial_json: str


@dataclass(frozen=True, kw_only=True)
class TurnEnd:
    """The turn is complete. `content` is the assistant message's blocks, ready to go back into the history
    (tool_use blocks carry the parsed `input`; a block whose input cannot be used carries `{}` and is listed in
    `bad_inputs` with why, in a sentence the model reads as the call's error)."""

    stop_reason: str
    content: list[dict[str, Any]]
    input_tokens: int
    output_tokens: int
    bad_inputs: dict[str, str] = field(default_factory=dict)


ModelEvent = ThinkingDelta | TextDelta | ToolUseStart | ToolUseDelta | TurnEnd


class Model(Protocol):
    """Streams one turn. Raises `service.errors.ModelError` on failure (with `retryable` set for 429, 529, 5xx,
    connection errors and mid-stream overload). The last event of a successful turn is `TurnEnd`."""

    @property
    def default_model(self) -> str: ...

    def stream_turn(self, request: TurnRequest) -> AsyncGenerator[ModelEvent, None]: ...

    async def aclose(self) -> None: ...
