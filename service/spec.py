"""A run's request as the loop takes it (`RunSpec`), and as a durable run's record keeps it (JSON), so that the
process that recovers the run after a crash rebuilds the very same run."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from service.slots import quick_init

SPEC_FORMAT = 1
"""The layout `RunSpec.to_json` writes; `from_json` refuses any other (a newer version's run is not run half-read)."""


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class RunSpec:
    """A validated request, in the loop's terms."""

    run_id: str
    message: str
    model: str
    system: str | None
    max_turns: int
    max_tokens: int
    tools: tuple[str, ...]
    metadata: Mapping[str, str] = field(default_factory=dict)
    max_tool_calls: int | None = None
    max_output_tokens: int | None = None
    # checkpointed (service/durable/): continued by another process if this one dies; the validator decides
    durable: bool = False
    trace_context: Any = None  # set by `_traced`: the run span, parent of the model_turn and tool_call spans

    def to_json(self) -> dict[str, Any]:
        """What a process that recovers the run rebuilds it from (`from_json`); the trace context stays here."""
        return {
            "v": SPEC_FORMAT,
            "run_id": self.run_id,
            "message": self.message,
            "model": self.model,
            "system": self.system,
            "max_turns": self.max_turns,
            "max_tokens": self.max_tokens,
            "tools": list(self.tools),
            "metadata": dict(self.metadata),
            "max_tool_calls": self.max_tool_calls,
            "max_output_tokens": self.max_output_tokens,
            "durable": self.durable,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunSpec:
        """The spec `to_json` wrote. ValueError for a newer format or unknown fields: a run written by a newer
        version is refused, not run with part of its request."""
        values = {k: v for k, v in data.items() if k != "trace_context"}  # this process's span only, never stored
        version = values.pop("v", None)
        if version != SPEC_FORMAT:
            raise ValueError(f"run spec format {version!r}; this version reads {SPEC_FORMAT}")
        values["tools"] = tuple(values.get("tools", ()))
        values["metadata"] = dict(values.get("metadata", {}))
        try:
            return cls(**values)
        except TypeError as exc:
            raise ValueError(f"bad run spec: {exc}") from exc
