"""Domain events as JSON, for the stores that keep them outside this process: a Redis stream of a run's events, a
run summary in the records database. `{"kind": …, <fields>}`; a tool's status by its value. Tool data is already
JSON-able when it gets here (`service/parts.py` made it so before it was logged).

JSON rather than pickle: another replica (of another version, during a rolling deploy) reads what this one wrote,
and a store's contents must never be able to run code in the reader."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from service import events as ev

_CLASSES: dict[str, type[Any]] = {cls.kind: cls for cls in ev.Event.__args__}


# each event class's field names: `dataclasses.fields` builds its tuple on every call, a third of an event's encoding
_FIELDS: dict[type[Any], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls)) for cls in _CLASSES.values()
}


def to_dict(event: ev.Event) -> dict[str, Any]:
    out: dict[str, Any] = {"kind": event.kind}
    for name in _FIELDS[type(event)]:
        value = getattr(event, name)
        if isinstance(value, ev.ToolStatus):
            value = value.value
        elif isinstance(value, tuple):
            value = list(value)
        out[name] = value
    return out


def from_dict(data: dict[str, Any]) -> ev.Event:
    """The event `to_dict` made. Raises ValueError for an unknown kind or fields this version does not have: a
    newer replica's event must fail loudly here rather than be shown half."""
    values = dict(data)
    kind = values.pop("kind", None)
    cls = _CLASSES.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    if "status" in values and cls is ev.ToolResult:
        values["status"] = ev.ToolStatus(values["status"])
    if "tools" in values and cls is ev.RunStarted:
        values["tools"] = tuple(values["tools"])
    if "approvers" in values and cls is ev.ApprovalRequired:
        values["approvers"] = tuple(values["approvers"])
    try:
        return cls(**values)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ValueError(f"bad {kind} event: {exc}") from exc


def dumps_many(events: list[ev.Event]) -> bytes:
    """Several events as one JSON array, in one call of the encoder (cheaper than joining `dumps` of each)."""
    return json.dumps([to_dict(e) for e in events], ensure_ascii=False, separators=(",", ":")).encode()


def dumps(event: ev.Event) -> bytes:
    return json.dumps(to_dict(event), ensure_ascii=False, separators=(",", ":")).encode()


def loads(raw: bytes | str) -> ev.Event:
    data = json.loads(raw)
    if not isinstance(data, dict):
        raise ValueError("an event is a JSON object")
    return from_dict(data)
