"""The offline model: replays a scenario file (turns of thinking, text and tool calls, with pacing) so that the
whole pipeline runs with no network. The default when no ANTHROPIC_API_KEY is set, and the model tests use.

Scenario YAML::

    name: demo
    pacing: {first_token_ms: 100, token_interval_ms: 20}
    turns:
      - thinking: "I should look at the orders."
        text: "Let me check."
        tool_calls:
          - {name: query_database, input: {sql: "select ..."}}
      - text: "Here is what I found: {results}"     # {results}, {message} are filled in
        fail: {status: 529, times: 1}               # optional: fail this turn's first request(s)

The turn played is the number of assistant messages already in the history, so a scenario reacts to where the
conversation is, not to how often it was called.
"""

from __future__ import annotations

import _json
import asyncio
import functools
import json
import re
import secrets
from collections import deque
from collections.abc import AsyncGenerator
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field

from service.config import Pacing
from service.errors import ModelError
from service.models.base import (
    ModelEvent,
    TextDelta,
    ThinkingDelta,
    ToolUseDelta,
    ToolUseStart,
    TurnEnd,
    TurnRequest,
)

_TOKEN = re.compile(r"\S*\s*")
REQUESTS_KEPT = 100


class ScriptedToolCall(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class ScriptedFailure(BaseModel):
    model_config = ConfigDict(extra="forbid")
    status: int = 529
    message: str = "overloaded"
    times: int = Field(default=1, ge=1)
    after_tokens: int = Field(default=0, ge=0, description="fail mid-stream after this many text tokens")

    @property
    def retryable(self) -> bool:
        return self.status in (408, 429) or self.status >= 500


class ScriptedTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    thinking: str = ""
    text: str = ""
    tool_calls: list[ScriptedToolCall] = Field(default_factory=list)
    fail: ScriptedFailure | None = None


class Scenario(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = "scenario"
    pacing: Pacing = Pacing()
    turns: list[ScriptedTurn] = Field(min_length=1)

    @classmethod
    def from_file(cls, path: Path) -> Scenario:
        return cls.model_validate(yaml.safe_load(path.read_text()))

    @classmethod
    def demo(cls) -> Scenario:
        text = resources.files("service").joinpath("scenarios/demo.yaml").read_text()
        return cls.model_validate(yaml.safe_load(text))


@functools.lru_cache(maxsize=256)
def tokens(text: str) -> tuple[str, ...]:
    """Split text into word-sized deltas whose concatenation is exactly `text`. Cached: a scenario replays the same
    texts run after run."""
    return tuple(t for t in _TOKEN.findall(text) if t)


class ScriptedModel:
    """Plays `scenario`; `pacing` overrides the scenario's. `requests` keeps the latest turn requests (for tests)."""

    def __init__(self, scenario: Scenario, *, pacing: Pacing | None = None) -> None:
        self.scenario = scenario
        self.pacing = pacing or scenario.pacing
        # the latest turn requests, for tests; bounded, since the offline model also serves long-running processes
        self.requests: deque[TurnRequest] = deque(maxlen=REQUESTS_KEPT)
        self._failures: dict[int, int] = {}

    @property
    def default_model(self) -> str:
        return f"scripted:{self.scenario.name}"

    async def aclose(self) -> None:
        pass

    async def stream_turn(self, request: TurnRequest) -> AsyncGenerator[ModelEvent, None]:
        self.requests.append(request)
        index = [m["role"] for m in request.messages].count("assistant")  # no generator: ~300 instructions less
        if index >= len(self.scenario.turns):
            turn = ScriptedTurn(text="(the scenario has no more turns)")
        else:
            turn = self.scenario.turns[index]
        failure = self._failure_due(index, turn)
        first_wait = self.pacing.first_token_ms / 1000
        step = self.pacing.token_interval_ms / 1000
        emitted = 0

        if failure is not None and failure.after_tokens == 0:
            await asyncio.sleep(first_wait)
            raise ModelError(failure.message, retryable=failure.retryable, status=failure.status)

        content: list[dict[str, Any]] = []
        if turn.thinking:
            for piece in tokens(turn.thinking):
                emitted += 1
                delay = first_wait if emitted == 1 else step
                if delay > 0 or emitted % 64 == 0:  # pacing (below)
                    await asyncio.sleep(delay)
                yield ThinkingDelta(text=piece)
            content.append({"type": "thinking", "thinking": turn.thinking, "signature": "scripted"})
        text = _fill(turn.text, request)
        if text:
            for i, piece in enumerate(tokens(text)):
                if failure is not None and i == failure.after_tokens:
                    raise ModelError(failure.message, retryable=failure.retryable, status=failure.status)
                emitted += 1
                delay = first_wait if emitted == 1 else step
                if delay > 0 or emitted % 64 == 0:  # pacing (below)
                    await asyncio.sleep(delay)
                yield TextDelta(text=piece)
            content.append({"type": "text", "text": text})
        # most turns ask for no tool: no set of the offered names nor list of calls to make (~2,300 instructions)
        calls = _offered(turn.tool_calls, request) if turn.tool_calls else []
        for call in calls:
            call_id = f"toolu_{secrets.token_hex(10)}"
            emitted += 1
            delay = first_wait if emitted == 1 else step
            if delay > 0 or emitted % 64 == 0:  # pacing (below)
                await asyncio.sleep(delay)
            yield ToolUseStart(call_id=call_id, name=call.name)
            for piece in _json_pieces(call.input):
                emitted += 1
                delay = first_wait if emitted == 1 else step
                if delay > 0 or emitted % 64 == 0:  # pacing (below)
                    await asyncio.sleep(delay)
                yield ToolUseDelta(call_id=call_id, partial_json=piece)
            content.append({"type": "tool_use", "id": call_id, "name": call.name, "input": call.input})
        messages = request.messages  # the loop's list is encoded as it is, not copied (~800 instructions)
        yield TurnEnd(
            stop_reason="tool_use" if calls else "end_turn",
            content=content,
            input_tokens=json_length(messages if type(messages) is list else list(messages)) // 4,
            output_tokens=emitted,
        )

    def _failure_due(self, index: int, turn: ScriptedTurn) -> ScriptedFailure | None:
        if turn.fail is None:
            return None
        seen = self._failures.get(index, 0)
        if seen >= turn.fail.times:
            return None
        self._failures[index] = seen + 1
        return turn.fail


def _offered(calls: list[ScriptedToolCall], request: TurnRequest) -> list[ScriptedToolCall]:
    offered = {t.name for t in request.tools}
    return [c for c in calls if c.name in offered]


# Pacing: the wait before the `emitted`th token is `first_wait` for the first, `step` for the others; unpaced, every
# 64th still lets the other tasks run (`asyncio.sleep(0)`). Written out where it is used: a call per token (or a
# pacing coroutine) would cost every token about 1,100 instructions.


# `json.dumps` makes a new encoder on every call: about 20,000 instructions for a one-message request, against about
# 8,000 for one C encoder made once and called with the same settings (json.dumps' defaults). No circular check: a
# turn's messages are a tree of JSON values.
_ENCODE = _json.make_encoder(
    None, json.JSONEncoder().default, _json.encode_basestring_ascii, None, ": ", ", ", False, False, True
)


def json_length(value: Any) -> int:
    """`len(json.dumps(value))`, for the token estimate: the model reports about four characters a token."""
    return len("".join(_ENCODE(value, 0)))


def _json_pieces(value: dict[str, Any], parts: int = 3) -> list[str]:
    """The input JSON cut in a few pieces, as a model streams it."""
    text = json.dumps(value)
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _fill(template: str, request: TurnRequest) -> str:
    if "{" not in template:
        return template
    return template.replace("{results}", _results_summary(request)).replace("{message}", _user_message(request))


def _user_message(request: TurnRequest) -> str:
    first = request.messages[0]["content"] if request.messages else ""
    if isinstance(first, str):
        return first
    return " ".join(b.get("text", "") for b in first if b.get("type") == "text")


def _results_summary(request: TurnRequest) -> str:
    """One line per tool result in the last user message, named after the tool_use blocks that asked for them."""
    names: dict[str, str] = {}
    for message in request.messages:
        if message["role"] == "assistant":
            names.update({b["id"]: b["name"] for b in message["content"] if b.get("type") == "tool_use"})
    last = request.messages[-1]["content"] if request.messages else []
    lines = []
    for block in last if isinstance(last, list) else []:
        if block.get("type") != "tool_result":
            continue
        name = names.get(block["tool_use_id"], "?")
        body = block["content"] if isinstance(block["content"], str) else json.dumps(block["content"])
        state = "failed" if block.get("is_error") else "answered"
        lines.append(f"\n- {name} {state}: {body[:160]}")
    return "".join(lines) or "(no tool results)"
