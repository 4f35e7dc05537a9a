"""Redaction: configured fields (personal data) and text patterns masked in what the service *records* about a call:
log lines, span attributes, audit rows and dead letters. Never in what the model reads or the caller streams: those
are the call itself, not a record of it.

A `Redactor` masks the value of every key named in `fields` anywhere in nested JSON (keys match ignoring case and
`_`, `-`, spaces: `cardNumber` matches `card_number`), and every match of `patterns` in strings. With nothing
configured it is a no-op that returns its argument as it is (one attribute check), so it costs nothing by default.

The service's redactor is process-wide (`install`, `active`), because logging is: `build_executor` installs the one
the config describes, and each sink uses it unless it was given its own.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

DEFAULT_MASK = "[REDACTED]"
TOO_DEEP = "[nested too deeply]"
_KEY_NOISE = re.compile(r"[\s_\-]+")


def _key(name: object) -> str:
    return _KEY_NOISE.sub("", str(name)).casefold()


class Redactor:
    """Masks configured fields and patterns. `value` walks JSON-like data (dicts, lists, tuples, strings) and returns
    a masked copy; `text` masks patterns in one string. Values nested deeper than `max_depth` become `TOO_DEEP`, so
    hostile input cannot exhaust the stack here (only when redaction is on: the no-op path does not walk)."""

    __slots__ = ("_fields", "_pattern", "enabled", "mask", "max_depth")

    def __init__(
        self, fields: Iterable[str] = (), patterns: Iterable[str] = (), *, mask: str = DEFAULT_MASK, max_depth: int = 64
    ) -> None:
        self._fields = frozenset(_key(f) for f in fields)
        sources = list(patterns)
        self._pattern = re.compile("|".join(f"(?:{p})" for p in sources)) if sources else None
        self.mask = mask
        self.max_depth = max_depth
        self.enabled = bool(self._fields or self._pattern)

    @classmethod
    def from_config(cls, config: Any) -> Redactor:
        """From the config's `redaction` section (fields, patterns, mask)."""
        return cls(config.fields, config.patterns, mask=config.mask)

    def text(self, value: str) -> str:
        if self._pattern is None:
            return value
        return self._pattern.sub(self.mask, value)

    def value(self, value: Any) -> Any:
        if not self.enabled:
            return value
        return self._walk(value, 0)

    def masks_key(self, name: str) -> bool:
        return bool(self._fields) and _key(name) in self._fields

    def _walk(self, value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict | list | tuple) and depth >= self.max_depth:
            return TOO_DEEP
        if isinstance(value, dict):
            return self._walk_dict(value, depth)
        if isinstance(value, list):
            return [self._walk(v, depth + 1) for v in value]
        if isinstance(value, tuple):
            return tuple(self._walk(v, depth + 1) for v in value)
        if isinstance(value, int | float) and not isinstance(value, bool) and self._pattern is not None:
            # a card number sent as a JSON number is the same secret as the string: masked, it becomes text
            try:
                digits = str(value)
            except ValueError:  # an int of more digits than Python writes in decimal: no pattern of ours is that long
                return value
            masked = self.text(digits)
            return value if masked == digits else masked
        return value

    def _walk_dict(self, value: dict[Any, Any], depth: int) -> dict[Any, Any]:
        fields = self._fields
        out: dict[Any, Any] = {}
        for k, v in value.items():
            item = self.mask if fields and _key(k) in fields else self._walk(v, depth + 1)
            # patterns apply to keys too (data keyed by e-mail address); two keys masked alike stay two entries
            key = self.text(k) if isinstance(k, str) else k
            if key != k:
                base, n = key, 1
                while key in out or key in value:
                    n += 1
                    key = f"{base} #{n}"
            out[key] = item
        return out


_active = Redactor()


def active() -> Redactor:
    """The process-wide redactor (a no-op one until `install`)."""
    return _active


def install(redactor: Redactor) -> None:
    global _active
    _active = redactor


def safe_json(value: Any, *, limit: int | None = None) -> str:
    """Canonical JSON (sorted keys, compact) of `value`, or a JSON string saying why it cannot be (nested deeper
    than the JSON encoder goes, circular): a record of hostile input must still be written. `limit` cuts the text."""
    try:
        text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    except (RecursionError, ValueError, TypeError) as exc:
        text = json.dumps(f"<not recordable as JSON: {type(exc).__name__}>")
    if limit is not None and len(text) > limit:
        text = text[:limit] + "…"
    return text
