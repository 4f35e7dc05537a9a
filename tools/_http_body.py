"""Reading an `http_request` response body within the size cap, and showing it to the model. The cap applies to the
decoded body, so the body is read raw and at most one layer of gzip or deflate is decoded here, never more than the
cap at a time: httpx's own decoders inflate each network read in full (a few KiB of gzip bomb become gigabytes, on
the event loop). Text is decoded with one of a few charsets, never a codec the server names."""

from __future__ import annotations

import asyncio
import codecs
import json
import zlib

import httpx

from tools.base import JSON, ToolError

# What requests ask for: the codings `_Inflater` reads (httpx would add br and zstd whenever their packages happen to
# be installed).
ACCEPT_ENCODING = "gzip, deflate"
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "x-gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
# Bytes read from the wire beyond the cap before a compressed body counts as cut: deflate can spend any number of
# bytes on no output (empty blocks), and never grows real data by more than this below ~200 MiB.
_WIRE_SLACK = 64 * 1024
# Text is decoded this many bytes at a time, with a turn for the event loop in between: where a charset's error
# handler runs on every byte (windows-1252's undefined bytes, UTF-16's lone surrogates) 1 MiB takes 125-250 ms in
# one call, 8 KiB ~2 ms. A thread would not help: a decode (or json.loads) is a single C call that holds the GIL
# throughout, so the event loop waits for it whichever thread runs it (measured: the same stall).
_DECODE_PIECE = 8 * 1024
_TEXT_MARKERS = ("json", "xml", "javascript", "x-www-form-urlencoded", "yaml", "csv")
# The charsets a body is decoded with, by label without "-" and "_"; any other reads as UTF-8. The server must not
# choose among all of Python's codecs: some are not text encodings at all, and punycode decodes in quadratic time
# (300 KB stalled the event loop for 1.5 s).
_CHARSETS = {
    "utf8": "utf-8",
    "utf16": "utf-16",
    "utf16le": "utf-16-le",
    "utf16be": "utf-16-be",
    "utf32": "utf-32",
    "utf32le": "utf-32-le",
    "utf32be": "utf-32-be",
    "usascii": "ascii",
    "ascii": "ascii",
    "iso88591": "latin-1",
    "latin1": "latin-1",
    "windows1252": "cp1252",
    "cp1252": "cp1252",
}


async def read_capped(response: httpx.Response, cap: int) -> tuple[bytes, bool]:
    """The body, decoded, cut at `cap` bytes, and whether it was cut. Raises `ToolError` for a content coding that
    is not read here (several layers, br, zstd…) or a body that is not valid gzip or deflate."""
    inflater = _inflater(response.headers)
    chunks: list[bytes] = []
    size = wire = 0
    async for raw in response.aiter_raw():
        wire += len(raw)
        chunk = raw if inflater is None else inflater.inflate(raw, cap - size + 1)
        if size + len(chunk) > cap:
            chunks.append(chunk[: cap - size])
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
        if inflater is not None and inflater.done:
            break  # bytes after the end of the compressed stream are not part of the body (httpx ignores them too)
        if wire > cap + _WIRE_SLACK:
            return b"".join(chunks), True
    return b"".join(chunks), False


def _inflater(headers: httpx.Headers) -> _Inflater | None:
    codings = [c.lower() for c in headers.get_list("content-encoding", split_commas=True) if c]
    codings = [c for c in codings if c != "identity"]
    if not codings:
        return None
    if len(codings) == 1 and codings[0] in _WBITS:
        return _Inflater(codings[0])
    raise ToolError(
        f"the response is encoded as {', '.join(codings)[:200]!r}; only a single gzip or deflate encoding is read"
    )


class _Inflater:
    """One layer of gzip or deflate, decoded at most `limit` bytes at a time: zlib's `max_length` stops inside a
    bomb instead of after it has filled memory."""

    def __init__(self, coding: str) -> None:
        self._coding = coding
        self._zlib = zlib.decompressobj(_WBITS[coding])
        self._started = False

    @property
    def done(self) -> bool:
        return self._zlib.eof

    def inflate(self, data: bytes, limit: int) -> bytes:
        """At most `limit` (≥ 1; 0 would mean no limit) bytes decoded from `data`. When fewer come back, all of
        `data` was used or the stream ended; when `limit` bytes come back, the caller stops reading."""
        assert limit >= 1
        try:
            out = self._zlib.decompress(data, limit)
        except zlib.error as exc:
            if self._coding == "deflate" and not self._started:
                # deflate should come wrapped in zlib's header, but some servers send it raw (httpx reads both)
                self._zlib, self._started = zlib.decompressobj(-zlib.MAX_WBITS), True
                return self.inflate(data, limit)
            raise ToolError(f"the response body is not valid {self._coding}: {exc}") from None
        self._started = True
        return out


async def shown(content_type: str, data: bytes, truncated: bool) -> JSON:
    """The body as the model sees it: parsed JSON when it is whole JSON, text for text types, else a placeholder."""
    media_type = content_type.split(";")[0].strip().lower()
    if media_type and not media_type.startswith("text/") and not any(m in media_type for m in _TEXT_MARKERS):
        return f"<{len(data)} bytes of {media_type}, not shown>"
    text = await _decoded(data, _charset(content_type))
    if not truncated and (media_type == "application/json" or media_type.endswith("+json")):
        try:
            # One C call on the event loop (see _DECODE_PIECE), bounded by the cap: 1 MiB of ordinary JSON takes
            # ~13 ms, JSON made to be slow (all floats, all empty arrays) up to ~55 ms with the service's gc
            # settings (~190 ms with Python's default thresholds); a higher max_response_bytes raises that in
            # proportion.
            return json.loads(text)
        except (ValueError, RecursionError):
            # a server that says JSON but sends something else, an integer of more digits than Python reads, or
            # arrays nested past the parser's recursion limit: show the text
            pass
    return text


async def _decoded(data: bytes, codec: str) -> str:
    """`data` as text, decoded `_DECODE_PIECE` bytes at a time with a turn for the event loop after each piece."""
    decoder = codecs.getincrementaldecoder(codec)(errors="replace")
    view = memoryview(data)
    parts: list[str] = []
    for start in range(0, len(data), _DECODE_PIECE):
        if start:
            await asyncio.sleep(0)
        parts.append(decoder.decode(view[start : start + _DECODE_PIECE]))
    parts.append(decoder.decode(b"", final=True))
    return "".join(parts)


def _charset(content_type: str) -> str:
    """The codec for the `charset` parameter of `content_type`, from `_CHARSETS`. Parsed here, not with httpx's
    `charset_encoding`: its email-based parser also reads RFC 2231 `charset*=` values, decoding them with a codec
    of the server's choosing (a 90 KB `charset*=punycode''…` header took 0.2 s)."""
    for param in content_type.split(";")[1:]:
        name, _, value = param.partition("=")
        if name.strip().lower() == "charset":
            label = value.strip().strip("\"'").lower().replace("-", "").replace("_", "")
            return _CHARSETS.get(label, "utf-8")
    return "utf-8"
