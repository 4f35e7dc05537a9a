"""`quick_init`: a frozen slotted dataclass built through its slots.

The `__init__` dataclasses writes for a frozen class sets every field with `object.__setattr__` (the class refuses
its own), about 1,300 instructions a field more than a plain class's. The hot path builds several such objects per
run (each event the loop yields, the run's `RunSpec`): a short call's four events alone have 17 fields.

Two ways, chosen by the number of fields (measured with callgrind, per object built):
- few fields: an `__init__` that sets each slot through its member descriptor, about 560 instructions a field more
  than a plain class's `self.x = x`;
- `_TWIN_FIELDS` or more: a `__new__` that builds an instance of a plain twin class with the same slots (its
  `self.x = x` costs what a plain class's does), then makes it an instance of the frozen class (`__class__`
  assignment, allowed between classes of the same layout), about 1,400 instructions once. A `RunSpec` (12 fields)
  costs 11,000 instructions to build instead of 16,300, a `FinalResponse` (7) about 2,500 less.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from typing import Any, TypeVar

T = TypeVar("T")

_TWIN_FIELDS = 3  # from here on the twin is cheaper: 3 x 560 > 1,400


def quick_init(cls: type[T]) -> type[T]:
    """`cls`, a frozen, keyword-only, slotted dataclass, built by an `__init__` or `__new__` that sets each slot
    directly. Same signature and defaults (a `default_factory` is called per instance, as dataclasses does); the
    instances are as frozen as before, and copy and pickle as before."""
    given = fields(cls)  # type: ignore[arg-type]
    twin = _twin(cls) if len(given) >= _TWIN_FIELDS else None
    scope: dict[str, Any] = {"_missing": MISSING, "_new": object.__new__, "_twin": twin}
    params, body = [], []
    for f in given:
        name = f.name
        if f.default is not MISSING:
            scope[f"_default_{name}"] = f.default
            params.append(f"{name}=_default_{name}")
        elif f.default_factory is not MISSING:
            scope[f"_factory_{name}"] = f.default_factory
            params.append(f"{name}=_missing")
            body.append(f"if {name} is _missing: {name} = _factory_{name}()")
        else:
            params.append(name)
        if twin is None:
            scope[f"_set_{name}"] = getattr(cls, name).__set__  # the slot's member descriptor
            body.append(f"_set_{name}(self, {name})")
        else:
            body.append(f"self.{name} = {name}")
    if twin is None:
        source = f"def __init__(self, *, {', '.join(params)}) -> None:\n    " + "\n    ".join(body or ["pass"])
    else:
        body = ["self = _new(_twin)", *body, "self.__class__ = cls", "return self"]
        source = f"def __new__(cls, *, {', '.join(params)}):\n    " + "\n    ".join(body)
    exec(source, scope)  # noqa: S102 - as dataclasses builds its own __init__
    made = scope["__init__" if twin is None else "__new__"]
    made.__qualname__ = f"{cls.__qualname__}.{made.__name__}"
    if twin is None:
        cls.__init__ = made  # type: ignore[method-assign]
    else:
        cls.__new__ = made  # type: ignore[method-assign]
        del cls.__init__  # object's: it accepts what `__new__` took
        # copy and pickle make an instance through `__new__` too, with these arguments (then set its state)
        cls.__getnewargs_ex__ = _new_args  # type: ignore[attr-defined]
    return cls


def _twin(cls: type) -> type | None:
    """A plain class with `cls`'s slots, whose instances may become `cls`'s (same layout); None if `cls` has a
    base or slots of its own beyond its fields."""
    slots = cls.__dict__.get("__slots__")
    if cls.__bases__ != (object,) or not isinstance(slots, tuple):
        return None
    twin = type(f"_{cls.__name__}Fields", (), {"__slots__": slots})
    return twin if twin.__basicsize__ == cls.__basicsize__ else None


def _new_args(self: Any) -> tuple[tuple[()], dict[str, Any]]:
    return (), {f.name: getattr(self, f.name) for f in fields(self)}
