"""Tool data too large for one event, cut into pieces before it is logged.

gRPC clients refuse a message over 4 MiB unless told otherwise (grpcurl, grpc-js and Python's own channels do), and
a tool result near a tool's cap (query_database's 4 MiB of values) becomes a larger message still as a protobuf
`Value`: the stream failed there, for every watcher and every replay. So data whose JSON text is over
`max_bytes` is logged as its JSON text in `ToolDataPart` events of at most `max_bytes`, followed by the event it
belongs to without its data, saying how many parts came (`data_parts`). The model is not affected: it got the
result before the result was logged. The JSON text in the log is also what the data costs to retain, which is
counted against the registry's byte budget (`runs.max_retained_bytes`).

`max_bytes` applies to the JSON text; as a protobuf `Value` the same data can take up to about 5 times as many bytes
(a one-digit number is 2 bytes of JSON and 11 of `Value`), so the default, 256 KiB, keeps every event under 1.5 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

from service import events as ev

WithData = ev.ToolResult | ev.ToolResultChunk


def split(event: WithData, max_bytes: int) -> tuple[list[ev.Event], int]:
    """The events that log `event`, and the size of its data as JSON text (bytes). Data written as JSON in at most
    `max_bytes` stays in the event; larger data goes in parts. Data that cannot be written as JSON at all (nested
    deeper than Python's recursion allows) is left to the protobuf conversion, which sends it as a marker."""
    data = event.data
    if data is None:
        return [event], 0
    text = _json_text(data)
    if text is None:
        return [event], 0
    if len(text) * 4 <= max_bytes:  # no character takes more than 4 bytes of UTF-8: small, without encoding it
        return [event], len(text)
    try:
        raw = text.encode()
    except UnicodeEncodeError:  # a lone surrogate (half an emoji, from a JSON escape a tool read): kept escaped
        raw = (_json_text(data, ascii_only=True) or "").encode()
    if len(raw) <= max_bytes:
        return [event], len(raw)
    pieces = _pieces(raw, max_bytes)
    parts: list[ev.Event] = [
        ev.ToolDataPart(call_id=event.call_id, index=i, total=len(pieces), json=piece) for i, piece in enumerate(pieces)
    ]
    parts.append(dataclasses.replace(event, data=None, data_parts=len(pieces)))
    return parts, len(raw)


def _json_text(data: Any, *, ascii_only: bool = False) -> str | None:
    try:
        return json.dumps(data, ensure_ascii=ascii_only, allow_nan=False, separators=(",", ":"))
    except ValueError:  # NaN or an infinity, which JSON has no number for: as protobuf's JSON mapping spells them
        try:
            return json.dumps(_finite(data, 0), ensure_ascii=ascii_only, separators=(",", ":"))
        except (ValueError, RecursionError):
            return None
    except RecursionError:
        return None


def _finite(value: Any, depth: int) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    if depth > 1000:
        raise RecursionError
    if isinstance(value, dict):
        return {k: _finite(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v, depth + 1) for v in value]
    return value


def _pieces(raw: bytes, max_bytes: int) -> list[str]:
    """`raw` (valid UTF-8) cut into text of at most `max_bytes` each, never inside a character: protobuf strings
    must be valid UTF-8."""
    pieces = []
    start = 0
    while start < len(raw):
        end = min(start + max_bytes, len(raw))
        while end < len(raw) and raw[end] & 0xC0 == 0x80:  # a continuation byte: the character starts earlier
            end -= 1
        pieces.append(raw[start:end].decode())
        start = end
    return pieces
