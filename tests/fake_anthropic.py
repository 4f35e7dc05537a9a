"""A local HTTP server that speaks the Anthropic Messages streaming protocol (SSE, the same events and fields as
the real API), scripted by tests, so that the real SDK and everything above it can be tested with no network.

    async with FakeAnthropic() as fake:
        fake.script_turn(text="Let me look.", tool_uses=[("query_database", {"sql": "select 1"})])
        fake.script_turn(text="Done.")
        fake.script_http_error(529)
        model = AnthropicModel(api_key="test-key", base_url=fake.base_url, default_model="claude-sonnet-4-6")
        ...
        assert fake.requests[0].body["model"] == ...

Tests import it as `from fake_anthropic import FakeAnthropic` (pytest puts `tests/` on the path). Each request to
`POST /v1/messages` takes the next scripted reply; with none left it answers HTTP 400 (an
`invalid_request_error` naming the problem, not retryable, so a test fails fast rather than hangs). A fake given
`on_request` calls it with each request's body first, so that the reply can depend on the conversation (the chaos
harness, `bench/chaos/`, answers many runs at once that way): it scripts the reply the request then takes.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

# The error type the real API sends with each status.
_ERROR_TYPES = {
    400: ("invalid_request_error", "Invalid request"),
    401: ("authentication_error", "invalid x-api-key"),
    403: ("permission_error", "Permission denied"),
    404: ("not_found_error", "Not found"),
    408: ("timeout_error", "Request timed out"),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Rate limited"),
    500: ("api_error", "Internal server error"),
    529: ("overloaded_error", "Overloaded"),
}


@dataclass(frozen=True)
class Text:
    """A text block; a string is streamed in `pieces` deltas, a sequence of strings one delta each."""

    text: str | Sequence[str]
    pieces: int = 3


@dataclass(frozen=True)
class Thinking:
    """A thinking block, its text streamed like `Text`, then its signature in one `signature_delta`."""

    thinking: str | Sequence[str]
    signature: str = "fake-signature"
    pieces: int = 3


@dataclass(frozen=True)
class ToolUse:
    """A tool_use block. `input` is a dict (sent as JSON) or a raw string (to send malformed JSON); a string is
    cut in `pieces` input_json_delta events, a sequence of strings sent as is. `id` defaults to `toolu_fake_<n>`."""

    name: str
    input: Mapping[str, Any] | str | Sequence[str] = field(default_factory=dict)
    id: str | None = None
    pieces: int = 3


@dataclass(frozen=True)
class RedactedThinking:
    """A redacted_thinking block: complete at its start (encrypted `data`), no deltas."""

    data: str = "fake-encrypted-thinking"


Block = Text | Thinking | ToolUse | RedactedThinking


@dataclass
class RecordedRequest:
    """What the server received: the JSON body, the headers (lower-case names) and the path."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    disconnected: bool = False  # the client went away before the reply was complete

    @property
    def api_key(self) -> str | None:
        """The key the client sent: SDK 2.x sends it as a bearer token, older clients as `x-api-key`."""
        bearer = self.headers.get("authorization", "")
        if bearer.startswith("Bearer "):
            return bearer.removeprefix("Bearer ")
        return self.headers.get("x-api-key")


@dataclass
class _Reply:
    status: int = 200
    error_body: dict[str, Any] | None = None
    events: list[tuple[str, dict[str, Any] | str]] = field(default_factory=list)
    hang: bool = False  # after the events, hold the stream open until the client goes away
    ping_every: float | None = None  # while hanging, a `ping` event this often (seconds)
    ping_as: str = "ping"  # the event type sent as the ping
    delay: float = 0.0  # seconds before each event
    headers: dict[str, str] = field(default_factory=dict)  # of an error reply


class FakeAnthropic:
    """The server. `start()` / `stop()` or `async with`; `base_url` once started; scripted replies are used in
    order; `requests` records every request; `disconnected` is set when a client drops a stream mid-reply."""

    def __init__(self, on_request: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.on_request = on_request
        self.requests: list[RecordedRequest] = []
        self.disconnected = asyncio.Event()
        self._replies: deque[_Reply] = deque()
        self._ids = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()
        self.base_url = ""

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"

    async def stop(self) -> None:
        self._stopping.set()  # releases hanging streams
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def pending(self) -> int:
        """Scripted replies not used yet."""
        return len(self._replies)

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    # Scripting.

    def script_turn(
        self,
        text: str | Sequence[str] | None = None,
        *,
        thinking: str | None = None,
        signature: str = "fake-signature",
        tool_uses: Iterable[tuple[str, Mapping[str, Any] | str]] = (),
        stop_reason: str | None = None,
        input_tokens: int = 25,
        output_tokens: int = 15,
        delay: float = 0.0,
    ) -> None:
        """A complete turn: thinking, then text, then one tool_use block per `(name, input)`."""
        blocks: list[Block] = []
        if thinking is not None:
            blocks.append(Thinking(thinking, signature=signature))
        if text is not None:
            blocks.append(Text(text))
        blocks.extend(ToolUse(name, tool_input) for name, tool_input in tool_uses)
        self.script_blocks(
            blocks,
            stop_reason=stop_reason,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            delay=delay,
        )

    def script_blocks(
        self,
        blocks: Sequence[Block],
        *,
        stop_reason: str | None = None,
        input_tokens: int = 25,
        output_tokens: int = 15,
        pings: bool = True,
        delay: float = 0.0,
    ) -> None:
        """A complete turn made of `blocks` in order. `stop_reason` defaults to tool_use when there is a tool_use
        block, else end_turn; `pings` interleaves `ping` events as the real API does."""
        if stop_reason is None:
            stop_reason = "tool_use" if any(isinstance(b, ToolUse) for b in blocks) else "end_turn"
        events = self._opening(input_tokens, pings) + self._block_events(blocks, pings)
        events.append(
            (
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                    "usage": {"output_tokens": output_tokens},
                },
            )
        )
        events.append(("message_stop", {"type": "message_stop"}))
        self._replies.append(_Reply(events=events, delay=delay))

    def script_http_error(
        self,
        status: int = 529,
        *,
        error_type: str | None = None,
        message: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """An HTTP error before any stream, with the API's error body (type and message default by status) and
        `headers` (such as `retry-after`)."""
        default_type, default_message = _ERROR_TYPES.get(status, ("api_error", f"HTTP {status}"))
        body = _error_body(error_type or default_type, message or default_message)
        self._replies.append(_Reply(status=status, error_body=body, headers=dict(headers or {})))

    def script_stream_error(
        self,
        blocks: Sequence[Block] = (),
        *,
        error_type: str = "overloaded_error",
        message: str = "Overloaded",
        delay: float = 0.0,
    ) -> None:
        """HTTP 200 and the start of a stream (`blocks`), then an `error` event, as when the API is overloaded
        mid-turn."""
        events = self._opening(25, True) + self._block_events(blocks, False)
        events.append(("error", _error_body(error_type, message)))
        self._replies.append(_Reply(events=events, delay=delay))

    def script_cut(self, blocks: Sequence[Block] = (), *, delay: float = 0.0) -> None:
        """HTTP 200 and the start of a stream (`blocks`), then a clean end without `message_stop`, as when a proxy
        cuts a stream short."""
        events = self._opening(25, True) + self._block_events(blocks, False)
        self._replies.append(_Reply(events=events, delay=delay))

    def script_events(self, events: Sequence[tuple[str, Mapping[str, Any] | str]]) -> None:
        """HTTP 200 and exactly these `(event name, data)` pairs, after the usual message_start: for streams the
        other scripts cannot make, such as ones that break the protocol. Data given as a str is sent as it is."""
        opening: list[tuple[str, dict[str, Any] | str]] = list(self._opening(25, False))
        scripted = [(name, data if isinstance(data, str) else dict(data)) for name, data in events]
        self._replies.append(_Reply(events=opening + scripted))

    def script_hang(
        self,
        blocks: Sequence[Block] = (),
        *,
        delay: float = 0.0,
        ping_every: float | None = None,
        ping_as: str = "ping",
    ) -> None:
        """HTTP 200 and the start of a stream (`blocks`), then nothing until the client disconnects, or only `ping`
        events (of type `ping_as`) every `ping_every` seconds, as an upstream that keeps the connection alive without
        content does."""
        events = self._opening(25, True) + self._block_events(blocks, False)
        self._replies.append(_Reply(events=events, hang=True, delay=delay, ping_every=ping_every, ping_as=ping_as))

    def clear(self) -> None:
        """Forget the scripted replies not used yet."""
        self._replies.clear()

    # Rendering scripts into the wire events.

    def _opening(self, input_tokens: int, pings: bool) -> list[tuple[str, dict[str, Any]]]:
        message: dict[str, Any] = {
            "id": f"msg_fake_{next(self._ids)}",
            "type": "message",
            "role": "assistant",
            "model": "",  # filled with the requested model when sent
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 1,
            },
        }
        events = [("message_start", {"type": "message_start", "message": message})]
        if pings:
            events.append(("ping", {"type": "ping"}))
        return events

    def _block_events(self, blocks: Sequence[Block], pings: bool) -> list[tuple[str, dict[str, Any]]]:
        events: list[tuple[str, dict[str, Any]]] = []
        for index, block in enumerate(blocks):
            start, deltas = self._render(block)
            events.append(("content_block_start", {"type": "content_block_start", "index": index, **start}))
            for delta in deltas:
                events.append(("content_block_delta", {"type": "content_block_delta", "index": index, **delta}))
                if pings and len(events) % 4 == 0:
                    events.append(("ping", {"type": "ping"}))
            events.append(("content_block_stop", {"type": "content_block_stop", "index": index}))
        return events

    def _render(self, block: Block) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The content_block_start fields and the deltas of one block."""
        if isinstance(block, Text):
            deltas = [{"delta": {"type": "text_delta", "text": t}} for t in _pieces(block.text, block.pieces)]
            return {"content_block": {"type": "text", "text": ""}}, deltas
        if isinstance(block, Thinking):
            deltas = [
                {"delta": {"type": "thinking_delta", "thinking": t}} for t in _pieces(block.thinking, block.pieces)
            ]
            deltas.append({"delta": {"type": "signature_delta", "signature": block.signature}})
            return {"content_block": {"type": "thinking", "thinking": "", "signature": ""}}, deltas
        if isinstance(block, RedactedThinking):
            return {"content_block": {"type": "redacted_thinking", "data": block.data}}, []
        raw = json.dumps(block.input) if isinstance(block.input, Mapping) else block.input
        # The real API opens every tool input with an empty partial_json.
        pieces = ["", *_pieces(raw, block.pieces)]
        start = {
            "content_block": {
                "type": "tool_use",
                "id": block.id or f"toolu_fake_{next(self._ids)}",
                "name": block.name,
                "input": {},
            }
        }
        return start, [{"delta": {"type": "input_json_delta", "partial_json": p}} for p in pieces]

    # Serving.

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        try:
            # As strict as the API: JSON proper, without Python's NaN and Infinity (the SDK refuses to send them).
            body = json.loads(await request.read(), parse_constant=_no_constant)
        except ValueError as err:
            self.requests.append(RecordedRequest(path=request.path, headers=dict(request.headers), body={}))
            error = _error_body("invalid_request_error", f"The request body is not valid JSON: {err}")
            return web.json_response(error, status=400)
        record = RecordedRequest(
            path=request.path, headers={k.lower(): v for k, v in request.headers.items()}, body=body
        )
        self.requests.append(record)
        if self.on_request is not None:  # scripts this request's reply, with no await before it is taken
            self.on_request(body)
        if not self._replies:
            error = _error_body("invalid_request_error", "FakeAnthropic: no scripted reply left for this request")
            return web.json_response(error, status=400)
        reply = self._replies.popleft()
        if reply.error_body is not None:
            headers = {"request-id": "req_fake", **reply.headers}
            return web.json_response(reply.error_body, status=reply.status, headers=headers)
        if body.get("stream") is not True:
            error = _error_body("invalid_request_error", "FakeAnthropic only serves stream=true")
            return web.json_response(error, status=400)
        thinking = body.get("thinking") or {}
        if thinking.get("type") == "enabled" and thinking.get("budget_tokens", 0) >= body.get("max_tokens", 0):
            # As the real API: thinking tokens count against max_tokens, so the budget must leave room below it.
            error = _error_body("invalid_request_error", "`max_tokens` must be greater than `thinking.budget_tokens`")
            return web.json_response(error, status=400)

        response = web.StreamResponse(
            status=200, headers={"content-type": "text/event-stream", "request-id": "req_fake"}
        )
        await response.prepare(request)
        try:
            for name, data in reply.events:
                if reply.delay:
                    await asyncio.sleep(reply.delay)
                if name == "message_start":
                    data = {**data, "message": {**data["message"], "model": body.get("model", "")}}
                text = data if isinstance(data, str) else json.dumps(data)  # a str: sent as it is, not as JSON
                await response.write(f"event: {name}\ndata: {text}\n\n".encode())
            if reply.hang:
                await self._wait_for_disconnect(request, response, reply.ping_every, reply.ping_as)
        except ConnectionError:
            pass  # the client went away mid-write
        if request.transport is None or request.transport.is_closing():
            record.disconnected = True
            self.disconnected.set()
            return response
        await response.write_eof()
        return response

    async def _wait_for_disconnect(
        self, request: web.Request, response: web.StreamResponse, ping_every: float | None, ping_as: str
    ) -> None:
        # aiohttp has no disconnect callback for a handler; the transport is dropped when the peer closes.
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + (ping_every or 0)
        while not self._stopping.is_set():
            if request.transport is None or request.transport.is_closing():
                return
            if ping_every is not None and loop.time() >= next_ping:
                await response.write(f'event: {ping_as}\ndata: {{"type": "{ping_as}"}}\n\n'.encode())
                next_ping += ping_every
            await asyncio.sleep(0.01)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}, "request_id": "req_fake"}


def _pieces(value: str | Sequence[str], parts: int) -> list[str]:
    """A string cut in `parts` nearly equal pieces (at least one, even when empty); a sequence as is."""
    if not isinstance(value, str):
        return list(value)
    size = max(1, -(-len(value) // max(1, parts)))
    return [value[i : i + size] for i in range(0, len(value), size)] or [""]
