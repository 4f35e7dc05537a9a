"""Server-Sent Events framing, and events as protobuf JSON (the canonical proto3 mapping: lowerCamelCase names,
64-bit integers as strings, RFC 3339 times, default values left out).

Text and thinking deltas, most of a run's events, are written directly: building the protobuf and walking it with
`json_format.MessageToDict` (reflection) cost 2.6 times as much (9.3 against 3.6 µs a frame, docs/performance.md).
The other kinds are rare and go through protobuf's own mapping. tests/test_http_sse.py checks the direct path
against protobuf's.
"""

from __future__ import annotations

import json
import time

from google.protobuf import json_format
from google.protobuf.message import Message

from service import events as ev
from service.rpc.convert import to_proto
from service.run import Entry

HEARTBEAT = b": keep-alive\n\n"
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def frame(entry: Entry, run_id: str) -> bytes:
    """One SSE event: `id` the seq (a coalesced delivery's last; its data says the first), `event` the kind."""
    event = entry.event
    kind = type(event)
    data = _delta(entry, run_id, _DELTAS[kind]) if kind in _DELTAS else _generic(entry, run_id)
    try:
        body = data.encode()
    except UnicodeEncodeError:  # a lone surrogate: protobuf's path replaces it (service/rpc/convert.py)
        body = _generic(entry, run_id).encode()
    return b"".join((b"id: %d\nevent: %s\ndata: " % (entry.seq, event.kind.encode()), body, b"\n\n"))


def comment(text: str) -> bytes:
    return b": " + text.replace("\r", " ").replace("\n", " ").encode() + b"\n\n"  # SSE ends a line at either


def message_json(message: Message) -> str:
    """Any protobuf message as one line of canonical JSON."""
    return _dumps(json_format.MessageToDict(message))


def _generic(entry: Entry, run_id: str) -> str:
    return message_json(to_proto(entry.event, run_id, entry.seq, time_ns=entry.time_ns, first_seq=entry.first_seq))


_DELTAS: dict[type[ev.Event], str] = {ev.TextDelta: "textDelta", ev.Thinking: "thinking"}


def _delta(entry: Entry, run_id: str, field: str) -> str:
    """A text or thinking delta, as `json_format` would write it."""
    event = entry.event
    assert isinstance(event, ev.TextDelta | ev.Thinking)
    delta: dict[str, object] = {}
    if event.turn:
        delta["turn"] = event.turn
    if event.text:
        delta["text"] = event.text
    out: dict[str, object] = {"runId": run_id, "seq": str(entry.seq)} if run_id else {"seq": str(entry.seq)}
    if entry.first_seq:
        out["firstSeq"] = str(entry.first_seq)
    out["time"] = timestamp(entry.time_ns)
    out[field] = delta
    return _dumps(out)


def timestamp(time_ns: int | None) -> str:
    """As protobuf's `Timestamp.ToJsonString`: UTC, with 0, 3, 6 or 9 digits of fraction."""
    seconds, nanos = divmod(time.time_ns() if time_ns is None else time_ns, 1_000_000_000)
    text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    if nanos == 0:
        return text + "Z"
    if nanos % 1_000_000 == 0:
        return f"{text}.{nanos // 1_000_000:03d}Z"
    if nanos % 1000 == 0:
        return f"{text}.{nanos // 1000:06d}Z"
    return f"{text}.{nanos:09d}Z"
