"""The Claude adapter: one turn through the Anthropic SDK's raw event stream, mapped to model events, with SDK
failures mapped once to `ModelError`.

Cancellation: `CancelledError` passes through untouched, and closing the generator (or cancelling its consumer)
closes the HTTP stream in `finally`, so the upstream connection is dropped at once rather than read to the end.
"""

from __future__ import annotations

import email.utils
import json
import time
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, cast

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
from service.models.base import (
    ModelEvent,
    TextDelta,
    ThinkingDelta,
    ToolUseDelta,
    ToolUseStart,
    TurnEnd,
    TurnRequest,
)

EffortLevel = Literal["low", "medium", "high", "xhigh", "max"]

# Error types an `error` event can carry after HTTP 200 that no other try will change: the request's own fault.
# Any other (overloaded, api_error, rate limit, timeout, a type not known yet, or data that is not the API's JSON,
# such as a proxy's "upstream connect error") is the upstream's trouble, worth another try.
_FINAL_STREAM_ERRORS = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "billing_error",
    }
)

# Stop reasons that end a turn wherever the output is: a tool_use block last in such a turn was cut off mid-input.
_CUT_OFF = frozenset({"max_tokens", "model_context_window_exceeded"})

_LABELS = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate limited",
    "api_error": "server error",
    "timeout_error": "timed out",
    "invalid_request_error": "invalid request",
    "authentication_error": "authentication failed",
    "permission_error": "permission denied",
    "not_found_error": "not found",
    "request_too_large": "request too large",
    "billing_error": "billing error",
}


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
        thinking_budget: int | None = None,
        adaptive_thinking: bool = False,
        effort: EffortLevel | None = None,
    ) -> None:
        # SDK retries off: the service retries whole turns itself, and SDK retries would hide attempts from it.
        self._client = anthropic.AsyncAnthropic(api_key=api_key, base_url=base_url, max_retries=0, timeout=timeout_s)
        self._default_model = default_model
        self._thinking_budget = thinking_budget
        self._adaptive: ThinkingConfigParam | None = {"type": "adaptive"} if adaptive_thinking else None
        self._output_config: OutputConfigParam | anthropic.Omit = {"effort": effort} if effort else anthropic.omit

    @property
    def default_model(self) -> str:
        return self._default_model

    async def aclose(self) -> None:
        await self._client.close()

    async def stream_turn(self, request: TurnRequest) -> AsyncGenerator[ModelEvent, None]:
        stream = await self._open(request)
        turn = _Turn()
        try:
            async for event in stream:
                for model_event in turn.feed(event):
                    yield model_event
        except (anthropic.AnthropicError, httpx2.HTTPError, json.JSONDecodeError, TimeoutError) as err:
            raise _model_error(err) from err
        finally:
            # Drops the connection when the turn is abandoned (cancel, aclose) rather than leaving it to the GC.
            await stream.close()
        yield turn.end()

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
        except Exception as err:
            # Anything the SDK raises here is a failed call, e.g. a TypeError for missing credentials.
            raise _model_error(err) from err


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
            self.input_tokens = event.message.usage.input_tokens
            self.output_tokens = event.message.usage.output_tokens
        elif event.type == "content_block_start":
            yield from self._start(event.index, event.content_block)
        elif event.type == "content_block_delta":
            block = self.blocks.get(event.index)
            if block is None:
                message = f"anthropic: malformed stream: a delta for content block {event.index}, which never started"
                raise ModelError(message, retryable=False)
            yield from self._delta(block, event.delta)
        elif event.type == "message_delta":
            self.stop_reason = event.delta.stop_reason or self.stop_reason
            self.output_tokens = event.usage.output_tokens
        elif event.type == "message_stop":
            self.stopped = True

    def _start(self, index: int, start: ContentBlock) -> Iterator[ModelEvent]:
        if start.type == "tool_use":
            self.blocks[index] = _Block(type="tool_use", call_id=start.id, name=start.name)
            yield ToolUseStart(call_id=start.id, name=start.name)
        elif start.type in ("text", "thinking"):
            self.blocks[index] = _Block(type=start.type)
        else:
            # e.g. redacted_thinking: complete at start, and must go back to the API as it came.
            self.blocks[index] = _Block(type=start.type, raw=dict(start.to_dict()))

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
                    content.append({"type": "text", "text": block.text})
            elif block.type == "thinking":
                content.append({"type": "thinking", "thinking": block.text, "signature": block.signature})
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


def _parse_input(raw: str) -> tuple[dict[str, Any], str | None]:
    """The tool input as a dict, or `{}` and why not."""
    if not raw.strip():
        return {}, None
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as err:
        return {}, f"tool input is not valid JSON: {err}"
    except ValueError as err:  # an integer of more digits than Python reads (4300 unless configured)
        return {}, f"tool input could not be read: {err}"
    if not isinstance(value, dict):
        return {}, f"tool input is a JSON {type(value).__name__}, not an object"
    return value, None


def _model_error(err: Exception) -> ModelError:
    """The one place SDK and transport failures become `ModelError`."""
    if isinstance(err, anthropic.APIStatusError):
        return _status_error(err)
    # TimeoutError: a socket or SSL timeout that reached us unwrapped; as worth another try as the SDK's own.
    if isinstance(err, anthropic.APITimeoutError | httpx2.TimeoutException | TimeoutError):
        return ModelError("anthropic: request timed out", retryable=True)
    if isinstance(err, anthropic.APIConnectionError):
        cause = err.__cause__ or err
        return ModelError(f"anthropic: connection failed: {cause}", retryable=True)
    if isinstance(err, httpx2.TransportError):
        return ModelError(f"anthropic: connection lost mid-stream: {err!r}", retryable=True)
    if isinstance(err, json.JSONDecodeError):
        return ModelError(f"anthropic: malformed stream event: {err}", retryable=False)
    return ModelError(f"anthropic: request failed: {type(err).__name__}: {err}", retryable=False)


def _status_error(err: anthropic.APIStatusError) -> ModelError:
    error_type = err.type or ""
    label = _LABELS.get(error_type, error_type or "error")
    detail = err.api_message or err.message
    request_id = f" [request-id {err.request_id}]" if err.request_id else ""
    if err.status_code == 200:
        # An `error` event after the stream began: no HTTP status to speak of, the error type decides.
        return ModelError(
            f"anthropic: {label} mid-stream: {detail}{request_id}",
            retryable=error_type not in _FINAL_STREAM_ERRORS,
        )
    status = err.status_code
    headers = err.response.headers
    # As the SDK's own retries decide (they are off here: the loop retries whole turns): the API's word first
    # (`x-should-retry`), else timeouts, lock conflicts, rate limits and server errors.
    should_retry = headers.get("x-should-retry", "").lower()
    retryable = (
        should_retry == "true" if should_retry in ("true", "false") else status in (408, 409, 429) or status >= 500
    )
    return ModelError(
        f"anthropic: {label} (HTTP {status}): {detail}{request_id}",
        retryable=retryable,
        status=status,
        retry_after_s=_retry_after(headers),
    )


def _retry_after(headers: httpx2.Headers) -> float | None:
    """How long the API asks us to wait (`retry-after-ms`, else `retry-after` in seconds or as a date), if it does:
    a 429's wait is how long the rate limit lasts, and another try before that fails again."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        return seconds if seconds > 0 else None
    when = email.utils.parsedate_tz(headers.get("retry-after", ""))
    if when is None:
        return None
    seconds = email.utils.mktime_tz(when) - time.time()
    return seconds if seconds > 0 else None
