"""The run's events keep what `@dataclass(frozen=True, kw_only=True, slots=True)` gives them with the quicker
`__init__` of `events.quick_init`: the same keyword-only signature and defaults, and instances that refuse to
change."""

from __future__ import annotations

import dataclasses
import inspect
import typing

import pytest

from service import events as ev

KINDS = typing.get_args(ev.Event)


def test_every_kind_is_built_with_its_fields_keyword_only_and_their_defaults() -> None:
    assert len(KINDS) >= 20
    for kind in KINDS:
        params = list(inspect.signature(kind).parameters.values())
        fields = dataclasses.fields(kind)
        assert [p.name for p in params] == [f.name for f in fields], kind
        assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params), kind
        for p, f in zip(params, fields, strict=True):
            expected = inspect.Parameter.empty if f.default is dataclasses.MISSING else f.default
            assert p.default == expected, (kind, f.name)


def test_an_event_is_frozen_equal_by_value_and_replaceable() -> None:
    result = ev.ToolResult(call_id="c1", name="echo", status=ev.ToolStatus.OK, duration_s=0.5)
    assert (result.data, result.error, result.attempts, result.cache_hit) == (None, "", 1, False)
    assert result == ev.ToolResult(call_id="c1", name="echo", status=ev.ToolStatus.OK, duration_s=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.error = "changed"  # type: ignore[misc]
    delta = ev.TextDelta(turn=1, text="a")
    assert dataclasses.replace(delta, text="ab") == ev.TextDelta(turn=1, text="ab")
    assert hash(delta) == hash(ev.TextDelta(turn=1, text="a"))
    with pytest.raises(TypeError):
        ev.TextDelta(1, "a")  # type: ignore[misc]
    with pytest.raises(TypeError):
        ev.TextDelta(turn=1)  # type: ignore[call-arg]


def test_a_run_spec_is_frozen_and_gets_a_fresh_default_per_instance() -> None:
    from service.spec import RunSpec

    def spec(**more: object) -> RunSpec:
        base = {"run_id": "r", "message": "m", "model": "x", "system": None, "max_turns": 1, "max_tokens": 1}
        return RunSpec(**base, tools=(), **more)  # type: ignore[arg-type]

    one, two = spec(), spec()
    assert one.metadata == {} and one.metadata is not two.metadata  # the factory, per instance
    assert (one.max_tool_calls, one.durable, one.trace_context) == (None, False, None)
    assert spec(metadata={"a": "b"}).metadata == {"a": "b"}
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.model = "other"  # type: ignore[misc]
    assert dataclasses.replace(one, model="y").model == "y"
    assert RunSpec.from_json(one.to_json()) == one
