"""The Model protocol: one streamed model turn in, model events out.

Conversation history uses the Anthropic Messages shape (`{"role": ..., "content": [blocks]}` with `text`,
`thinking`, `tool_use` and `tool_result` blocks) because it is the richest of the shapes we speak; other adapters
translate from it.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from service.slots import quick_init

# Deeper than any tool's schema goes, far below what the JSON encoders, the SDK and protobuf (32 levels, then JSON
# text) can take: a tool input nested deeper is refused rather than allowed to fail later in one of them.
MAX_INPUT_DEPTH = 100


@dataclass(frozen=True, kw_only=True)
class ToolSpec:
    """A tool as the model sees it."""

    name: str
    description: str
    input_schema: dict[str, Any]


# `TurnRequest` and the model's events below are made for every turn and every event it streams: built through their
# slots (`quick_init`), as the service's events are. A turn of one text delta costs about 11,600 instructions less
# (callgrind: a `TurnRequest` and a `TurnEnd` 5,300 each, a `TextDelta` 1,000).
@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class TurnRequest:
    model: str
    system: str | None
    messages: Sequence[dict[str, Any]]
    tools: Sequence[ToolSpec]
    max_tokens: int


# What a model turn streams. `index` is the content block's position in the turn.


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ThinkingDelta:
    text: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class TextDelta:
    text: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolUseStart:
    call_id: str
    name: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolUseDelta:
    call_id: str
    partial_json: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
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
    connection errors and mid-stream overload, and `kind` saying what failed). The last event of a successful turn
    is `TurnEnd`, whose content can go back to the API as it is (see `unsendable`, `plain_text`)."""

    @property
    def default_model(self) -> str: ...

    def stream_turn(self, request: TurnRequest) -> AsyncGenerator[ModelEvent, None]: ...

    async def aclose(self) -> None: ...


def unsendable(value: Any) -> str | None:
    """Why `value`, a tool input as `json.loads` read it from the model, cannot go back to the model API in the
    history (whose JSON must be UTF-8, with finite numbers), or None when it can: a clause to follow "tool input".
    Walked with a stack of its own, not recursion, since the input is the model's to nest."""
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and plain_text(item) is not item:
                return "has text that is not valid Unicode (a lone surrogate escape such as \\ud800)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return "has a number JSON cannot carry (beyond a double's range, such as 1e400, or NaN)"
        elif isinstance(item, dict | list):
            if depth >= MAX_INPUT_DEPTH:
                return f"is nested more than {MAX_INPUT_DEPTH} levels deep"
            if isinstance(item, dict):
                stack.extend((key, depth) for key in item)
                stack.extend((v, depth + 1) for v in item.values())
            else:
                stack.extend((v, depth + 1) for v in item)
    return None


def plain_text(text: str) -> str:
    """`text` with each lone surrogate (half an emoji, as `json.loads` reads the escape "\\ud83d") replaced by
    U+FFFD: such a string cannot be encoded as UTF-8, so a request carrying it fails before it is sent. `text`
    itself (the same object) when it has none."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text
