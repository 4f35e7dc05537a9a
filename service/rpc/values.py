"""Python values as protobuf `Struct` and `Value`: tool inputs and data come from outside, and whatever they hold
becomes a message every client can read, never an exception that ends the stream (`struct` gives the rules)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from google.protobuf import struct_pb2

from service.redact import TOO_DEEP

MAX_DEPTH = 32


def struct(value: Mapping[str, Any]) -> struct_pb2.Struct:
    """`value` as a Struct. Never raises: tool data and tool inputs come from outside (a tool, the model;
    `http_request` returns a remote body as `json.loads` read it), and a value protobuf refused would end the stream,
    every WatchRun replay of the run at the same seq, and its unary answer. The same rules make tool data `Value`s:

    - str, bool, None, dicts and lists (and tuples) are what they are; ints and floats are numbers, i.e. doubles, so
      an int past 2**53 loses precision;
    - an int beyond a double's range (about 1.8e308) is a string of its decimal digits (hex, "0x…", past Python's
      4300-digit limit on decimal conversion); NaN and the infinities are the strings "NaN", "Infinity" and
      "-Infinity", their spellings in protobuf's JSON mapping, which has no number for them (MessageToJson refuses);
    - a dict key that is not a string is written as JSON writes keys (1 → "1", None → "null", True → "true"), or
      with str(); any other value (bytes, set, datetime, Decimal…) is str(value), as `to_json` makes tool data for
      the model;
    - a container nested deeper than MAX_DEPTH is sent as its JSON text (a string), or as "[nested too deeply]" when
      even that cannot be written (circular data). Protobuf parsers refuse messages nested more than 100 deep and
      each dict costs three levels (Value, Struct, map entry): a tool result with 33 nested dicts is an event no
      client can read.

    Written out rather than with `json_format.ParseDict` / `Struct.update`, which raise on most of the above: one
    pass with `type() is` tests for the JSON types it nearly always meets, setting fields in place, builds a typical
    tool result event 1.7 to 4 times faster than ParseDict did."""
    out = struct_pb2.Struct()
    try:
        fill_struct(out, value, 1)
    except UnicodeEncodeError:  # a lone surrogate in a key or a string (see `convert.to_proto`)
        out = struct_pb2.Struct()
        fill_struct(out, scrub(value, 0), 1)
    return out


_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(value: Any, depth: int) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if depth > 4 * MAX_DEPTH:  # deeper than the conversion ever walks (it sends such data as text)
        return TOO_DEEP
    if isinstance(value, Mapping):
        return {scrub(k, depth): scrub(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v, depth + 1) for v in value]
    return value


def set_value(out: struct_pb2.Value, value: Any, depth: int) -> None:
    """Sets `out` to `value`, which sits inside `depth` containers, by the rules `struct` describes."""
    kind = type(value)
    if kind is str:
        out.string_value = value
    elif kind is int:
        try:
            out.number_value = value
        except OverflowError:
            out.string_value = _int_text(value)
    elif kind is float:
        if math.isfinite(value):
            out.number_value = value
        else:
            out.string_value = "NaN" if math.isnan(value) else "Infinity" if value > 0 else "-Infinity"
    elif kind is bool:
        out.bool_value = value
    elif value is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif kind is dict:
        _set_struct(out, value, depth)
    elif kind is list:
        _set_list(out, value, depth)
    else:
        _set_other(out, value, depth)


def _set_struct(out: struct_pb2.Value, value: Mapping[Any, Any], depth: int) -> None:
    if depth >= MAX_DEPTH:
        out.string_value = _json_text(value)
    else:
        out.struct_value.SetInParent()  # an empty dict is still a dict
        fill_struct(out.struct_value, value, depth + 1)


def fill_struct(out: struct_pb2.Struct, value: Mapping[Any, Any], depth: int) -> None:
    """`depth` counts the containers around the items, this one included."""
    fields = out.fields
    for key, item in value.items():
        set_value(fields[key if type(key) is str else _key_text(key)], item, depth)


def _set_list(out: struct_pb2.Value, value: Any, depth: int) -> None:
    if depth >= MAX_DEPTH:
        out.string_value = _json_text(value)
        return
    out.list_value.SetInParent()  # an empty list is still a list
    values = out.list_value.values
    for item in value:
        set_value(values.add(), item, depth + 1)


def _set_other(out: struct_pb2.Value, value: Any, depth: int) -> None:
    """Subclasses of the JSON types (an IntEnum, an OrderedDict), tuples, and whatever else a tool or model sent."""
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, int):  # bool cannot be subclassed, so this is an IntEnum or the like
        set_value(out, int(value), depth)
    elif isinstance(value, float):
        set_value(out, float(value), depth)
    elif isinstance(value, Mapping):
        _set_struct(out, value, depth)
    elif isinstance(value, list | tuple):
        _set_list(out, value, depth)
    else:
        out.string_value = _text(value)


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool | float):
        return json.dumps(key)  # "null", "true", "1.5", "NaN"
    if isinstance(key, int):
        return _int_text(int(key))
    return _text(key)


def _int_text(value: int) -> str:
    try:
        return str(value)
    except ValueError:  # more digits than sys.get_int_max_str_digits() allows in decimal
        return hex(value)


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value, default=_text, ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):  # circular, a tuple key, an int of over 4300 digits
        return TOO_DEEP


def _text(value: Any) -> str:
    try:
        return str(value)
    except Exception:  # a broken __str__ is no reason to end the stream
        return f"<{type(value).__name__}>"
