"""The Claude adapter: one turn through the Anthropic SDK's raw event stream, mapped to model events, with SDK
failures mapped once to `ModelError`. The upstream is not trusted: a stream that breaks the protocol is a
`malformed` ModelError, a turn is bounded in silence and in total time, and whatever the history gets back from a
turn (text, tool inputs, ids) can be sent to the API again.

Cancellation: `CancelledError` passes through untouched, and closing the generator (or cancelling its consumer)
closes the HTTP stream in `finally`, so the upstream connection is dropped at once rather than read to the end.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, cast

import anthropic
import httpx2
from anthropic.types import (
    ContentBlock,
    MessageParam,
    OutputConfigParam,
    RawContentBlockDelta,
    RawMessageStreamEvent,
    ThinkingConfigParam,
    ToolParam,
)

from service.errors import ModelError
from service.models.anthropic_errors import malformed, model_error
from service.models.base import (
    MAX_INPUT_DEPTH,
    ModelEvent,
    TextDelta,
    ThinkingDelta,
    ToolUseDelta,
    ToolUseStart,
    TurnEnd,
    TurnRequest,
    plain_text,
    unsendable,
)

T = TypeVar("T")
EffortLevel = Literal["low", "medium", "high", "xhigh", "max"]

# Errors the SDK's stream raises, or that reading its loosely built events raises, when the upstream's data is not
# the Messages protocol: a field missing or of another type, JSON that is not JSON or is nested past the parser.
_GARBLED = (AttributeError, TypeError, KeyError, ValueError, RecursionError)

# The events of the Messages protocol: any of them is news from the model, which resets the silence bound.
_CONTENT = frozenset(
    {
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    }
)

# Stop reasons that end a turn wherever the output is: a tool_use block last in such a turn was cut off mid-input.
_CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})


class AnthropicModel:
    """Streams turns from the Anthropic Messages API. `api_key` / `base_url` left None fall back to the SDK's
    environment handling (`ANTHROPIC_API_KEY`, `ANTHROPIC_BASE_URL`)."""

    def __init__(
        self,
        *,
        api_key: str | None = None,
        base_url: str | None = None,
        default_model: str = "claude-sonnet-4-6",
        timeout_s: float = 120.0,
        idle_timeout_s: float = 120.0,
        turn_timeout_s: float = 1800.0,
        thinking_budget: int | None = None,
        adaptive_thinking: bool = False,
        effort: EffortLevel | None = None,
    ) -> None:
        # SDK retries off: the service retries whole turns itself, and SDK retries would hide attempts from it.
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self._default_model = default_model
        # `timeout_s` bounds each read, and keep-alive pings are reads: these bound what the SDK cannot see.
        self._idle_timeout_s = idle_timeout_s
        self._turn_timeout_s = turn_timeout_s
        self._thinking_budget = thinking_budget
        self._adaptive: ThinkingConfigParam | None = {"type": "adaptive"} if adaptive_thinking else None
        self._output_config: OutputConfigParam | anthropic.Omit = {"effort": effort} if effort else anthropic.omit

    @property
    def default_model(self) -> str:
        return self._default_model

    async def aclose(self) -> None:
        await self._client.close()

    async def stream_turn(self, request: TurnRequest) -> AsyncGenerator[ModelEvent, None]:
        clock = asyncio.get_running_loop().time
        turn_due = clock() + self._turn_timeout_s
        # Until the response's headers come, the SDK's own timeout is the silence bound: nothing is read before.
        stream = await self._bounded(self._open(request), turn_due, None)
        turn = _Turn()
        try:
            heard = clock()
            while True:
                try:
                    event = await self._bounded(anext(stream), turn_due, heard + self._idle_timeout_s)
                except StopAsyncIteration:
                    break
                if getattr(event, "type", None) in _CONTENT:  # the SDK drops pings; an event of no known type is noise
                    heard = clock()
                for model_event in turn.feed(event):
                    yield model_event
        except (anthropic.AnthropicError, httpx2.HTTPError, TimeoutError, *_GARBLED) as err:
            raise model_error(err) from err
        finally:
            # Drops the connection when the turn is abandoned (cancel, aclose) rather than leaving it to the GC.
            await stream.close()
        yield turn.end()

    async def _bounded(self, step: Awaitable[T], turn_due: float, idle_due: float | None) -> T:
        """`step` (opening the stream, or reading its next event), within the turn's total bound and its silence
        bound (`idle_due`, if any). Only this await is bounded, never the consumer's work between events: a timeout
        around a `yield` would cancel whatever the consumer awaits."""
        idle_due = turn_due if idle_due is None else idle_due
        bound = asyncio.timeout_at(min(idle_due, turn_due))
        try:
            async with bound:
                return await step
        except TimeoutError:
            if not bound.expired():
                raise  # the SDK's or the socket's own
            if idle_due < turn_due:
                message = f"anthropic: the model sent no content for {self._idle_timeout_s:g} s (model.idle_timeout_s)"
            else:
                message = (
                    f"anthropic: the model turn took longer than {self._turn_timeout_s:g} s (model.turn_timeout_s)"
                )
            raise ModelError(message, retryable=True, kind="unavailable") from None

    async def _open(self, request: TurnRequest) -> anthropic.AsyncStream[RawMessageStreamEvent]:
        tools = [ToolParam(name=t.name, description=t.description, input_schema=t.input_schema) for t in request.tools]
        thinking: ThinkingConfigParam | anthropic.Omit = self._adaptive or anthropic.omit
        # Manual thinking counts against max_tokens and the API refuses a budget not below it: with a caller's smaller
        # max_tokens the run goes without thinking rather than fail over a setting the caller cannot see.
        if self._thinking_budget is not None and self._thinking_budget < request.max_tokens:
            thinking = {"type": "enabled", "budget_tokens": self._thinking_budget}
        try:
            return await self._client.messages.create(
                model=request.model,
                system=request.system if request.system is not None else anthropic.omit,
                # History is already in the Messages shape (see `service.models.base`).
                messages=cast("list[MessageParam]", list(request.messages)),
                tools=tools or anthropic.omit,
                max_tokens=request.max_tokens,
                thinking=thinking,
                output_config=self._output_config,
                stream=True,
            )
        except (anthropic.AnthropicError, httpx2.HTTPError, TimeoutError) as err:
            raise model_error(err) from err
        except Exception as err:
            # Anything else the SDK raises here is a request it could not make, e.g. a TypeError for missing
            # credentials: the server's own set-up, which no other try changes.
            raise ModelError(f"anthropic: request failed: {type(err).__name__}: {err}", retryable=False) from err


@dataclass
class _Block:
    """One content block as it streams in."""

    type: str
    text: str = ""
    signature: str = ""
    call_id: str = ""
    name: str = ""
    raw: dict[str, Any] = field(default_factory=dict)  # blocks we pass through as they started


class _Turn:
    """Folds the raw events of one message into model events and, at the end, the assistant content."""

    def __init__(self) -> None:
        self.blocks: dict[int, _Block] = {}
        self.stop_reason: str | None = None
        self.input_tokens = 0
        self.output_tokens = 0
        self.stopped = False

    def feed(self, event: RawMessageStreamEvent) -> Iterator[ModelEvent]:
        if event.type == "message_start":
            self.input_tokens = _count(event.message.usage.input_tokens)
            self.output_tokens = _count(event.message.usage.output_tokens)
        elif event.type == "content_block_start":
            yield from self._start(event.index, event.content_block)
        elif event.type == "content_block_delta":
            block = self.blocks.get(event.index)
            if block is None:
                raise malformed(f"a delta for content block {event.index!r}, which never started")
            yield from self._delta(block, event.delta)
        elif event.type == "message_delta":
            stop_reason = event.delta.stop_reason
            if stop_reason is not None and not isinstance(stop_reason, str):
                raise malformed(f"a stop_reason that is not a string: {stop_reason!r}"[:200])
            self.stop_reason = stop_reason or self.stop_reason
            self.output_tokens = _count(event.usage.output_tokens)
        elif event.type == "message_stop":
            self.stopped = True

    def _start(self, index: int, start: ContentBlock) -> Iterator[ModelEvent]:
        if type(index) is not int or type(start.type) is not str:
            raise malformed(f"a content block {index!r} of type {start.type!r}"[:200])
        if start.type == "tool_use":
            call_id, name = start.id, start.name
            if not (isinstance(call_id, str) and call_id and isinstance(name, str)):
                raise malformed("a tool_use block without a string id and name")
            if _TOOL_ID.fullmatch(call_id) is None or _TOOL_NAME.fullmatch(name) is None:
                raise malformed(f"a tool_use block whose id or name the API would refuse: {call_id!r}, {name!r}"[:200])
            # Sent back in the history, which must be UTF-8, and told apart by id there: the API's ids never repeat.
            call_id, name = plain_text(call_id), plain_text(name)
            if any(b.call_id == call_id for b in self.blocks.values()):
                raise malformed(f"two tool_use blocks with the id {call_id!r}"[:200])
            self.blocks[index] = _Block(type="tool_use", call_id=call_id, name=name)
            yield ToolUseStart(call_id=call_id, name=name)
        elif start.type in ("text", "thinking"):
            self.blocks[index] = _Block(type=start.type)
        else:
            # e.g. redacted_thinking: complete at start, and must go back to the API as it came (when it can).
            raw = dict(start.to_dict(warnings=False))  # fields of types the SDK does not expect are no bug of ours
            problem = unsendable(raw)
            if problem is not None:
                raise malformed(f"a {start.type!r} block that {problem}"[:200])
            self.blocks[index] = _Block(type=start.type, raw=raw)

    def _delta(self, block: _Block, delta: RawContentBlockDelta) -> Iterator[ModelEvent]:
        if delta.type == "text_delta":
            block.text += delta.text
            yield TextDelta(text=delta.text)
        elif delta.type == "thinking_delta":
            block.text += delta.thinking
            yield ThinkingDelta(text=delta.thinking)
        elif delta.type == "signature_delta":
            block.signature = delta.signature
        elif delta.type == "input_json_delta" and delta.partial_json:
            # The API opens each tool input with an empty piece; it tells a consumer nothing.
            block.text += delta.partial_json
            yield ToolUseDelta(call_id=block.call_id, partial_json=delta.partial_json)
        # citations_delta: we send no documents, so there are no citations to keep.

    def end(self) -> TurnEnd:
        if not self.stopped:
            raise ModelError("anthropic: the stream ended before message_stop", retryable=True)
        content: list[dict[str, Any]] = []
        bad_inputs: dict[str, str] = {}
        stop_reason = self.stop_reason or "end_turn"
        blocks = [block for _, block in sorted(self.blocks.items())]
        for block in blocks:
            if block.type == "text":
                # The API refuses empty text blocks in the history it is sent back.
                if block.text:
                    content.append({"type": "text", "text": plain_text(block.text)})
            elif block.type == "thinking":
                thinking = {"thinking": plain_text(block.text), "signature": plain_text(block.signature)}
                content.append({"type": "thinking", **thinking})
            elif block.type == "tool_use":
                tool_input, error = _parse_input(block.text)
                if error is not None:
                    bad_inputs[block.call_id] = error
                content.append({"type": "tool_use", "id": block.call_id, "name": block.name, "input": tool_input})
            else:
                content.append(block.raw)
        if stop_reason in _CUT_OFF and blocks and blocks[-1].type == "tool_use":
            # Its input is whatever came before the cut: nothing, or JSON that may even parse but is not all of it.
            bad_inputs[blocks[-1].call_id] = (
                f"the turn ended ({stop_reason}) before this tool call's input was complete, so the call did not run; "
                "try again with a shorter input"
            )
            content[-1]["input"] = {}
        return TurnEnd(
            stop_reason=stop_reason,
            content=content,
            input_tokens=self.input_tokens,
            output_tokens=self.output_tokens,
            bad_inputs=bad_inputs,
        )


_REPLACED = "; it is replaced by {} in the conversation"


def _parse_input(raw: str) -> tuple[dict[str, Any], str | None]:
    """The tool input as a dict, or `{}` (what goes back to the API in its place) and why not."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        return {}, f"tool input is not valid JSON: {err}"
    except ValueError as err:  # an integer of more digits than Python reads (4300 unless configured)
        return {}, f"tool input could not be read: {err}"
    except RecursionError:
        return {}, f"tool input is nested more than {MAX_INPUT_DEPTH} levels deep{_REPLACED}"
    if not isinstance(value, dict):
        return {}, f"tool input is a JSON {type(value).__name__}, not an object"
    problem = unsendable(value)
    if problem is not None:
        # As it came it would make the next request fail (the SDK refuses to encode it): the history gets {}.
        return {}, f"tool input {problem}{_REPLACED}"
    return value, None


# No turn counts more tokens than this (a context window is about 1e6): a count beyond it is a broken stream, and
# would not fit the events' uint32/uint64 fields either (an outside finding: 1e20 failed the call with INTERNAL, and
# every later GetRun, WatchRun and ListRuns of the caller with it)
MAX_TOKEN_COUNT = 10**9

# What the API's tool_use ids and tool names are made of: each goes back to it in the next request's history, where
# anything else would be refused (a 400 blamed on the caller), so a stream with such a block is a broken stream
_TOOL_ID = re.compile(r"[A-Za-z0-9_-]{1,256}")
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")  # as the API defines a tool name


def _count(value: Any) -> int:
    """A token count from the stream."""
    if type(value) is not int or not 0 <= value <= MAX_TOKEN_COUNT:
        raise malformed(f"a token count that is not a whole number from 0 to {MAX_TOKEN_COUNT}: {value!r}"[:200])
    return value
