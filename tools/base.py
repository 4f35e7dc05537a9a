"""What a tool is: a name, a description, a pydantic input model (its JSON Schema goes to the model) and an async
implementation that returns a result or yields result chunks.

A tool knows nothing of gRPC, the agent loop or its policies; the executor (`service/executor.py`) validates the
input, runs the tool and turns what it returns or raises into events.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from tools.policy import ToolPolicy

# A JSON value: what a tool returns and what a chunk holds (dict, list, str, int, float, bool or None).
JSON = Any

InputT = TypeVar("InputT", bound=BaseModel)


class ToolError(Exception):
    """A failure the model should read as the tool's answer (bad SQL, host not allowed, upstream 500…).

    `retryable` marks transient failures (timeouts, 5xx, connection resets) that a retry policy may try again.
    """

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True, kw_only=True)
class ToolConfig:
    """What a tool is built from: its section of the YAML config (`tools.<name>`) and the service's data folder."""

    data_dir: Path
    options: Mapping[str, Any] = field(default_factory=dict)


class Tool(abc.ABC, Generic[InputT]):
    """Base class of every tool. Subclasses set the class variables and override `run` or, if `streaming`, `stream`.

    `run` may raise `ToolError` for failures the model should see; any other exception is reported to the model as
    an internal tool error and logged. Blocking work (SQLite, files) must not run on the event loop: use
    `asyncio.to_thread`.
    """

    name: ClassVar[str]
    description: ClassVar[str]
    Input: ClassVar[type[BaseModel]]
    streaming: ClassVar[bool] = False
    policy: ClassVar[ToolPolicy] = ToolPolicy()  # how the executor calls it; `policies.<name>` in the config overrides
    # Why the tool cannot work on this server (set when it is built: a sandbox with no usable interpreter…). The
    # service then logs it once, leaves the tool out of ListTools and refuses runs that name it.
    unavailable: str | None = None

    def input_schema(self) -> dict[str, Any]:
        """The JSON Schema sent to the model and returned by ListTools."""
        return self.Input.model_json_schema()

    def validate(self, raw: Mapping[str, Any]) -> InputT:
        """Parse the model's input; raises `pydantic.ValidationError`. Override to add rules the schema cannot say."""
        return self.Input.model_validate(raw)  # type: ignore[return-value]

    async def run(self, args: InputT) -> JSON:
        """The tool's result. Streaming tools get this for free: the list of their chunks."""
        if not self.streaming:
            raise NotImplementedError(f"{type(self).__name__} must implement run()")
        return [chunk async for chunk in self.stream(args)]

    async def stream(self, args: InputT) -> AsyncIterator[JSON]:
        """Streaming tools yield their result chunk by chunk (each becomes a `tool_result_chunk` event)."""
        raise NotImplementedError(f"{type(self).__name__} does not stream")
        yield  # pragma: no cover - makes this an async generator

    def total_chunks(self, args: InputT) -> int | None:
        """The number of chunks `stream` will yield, when known in advance."""
        return None

    async def aclose(self) -> None:
        """Release what the tool holds (connections, pools). Called once at server shutdown."""
