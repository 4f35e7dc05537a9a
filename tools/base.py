"""What a tool is: a name, a description, a pydantic input model (its JSON Schema goes to the model) and an async
implementation that returns a result or yields result chunks; and `current_call()`, which call it is running for.

A tool knows nothing of gRPC, the agent loop or its policies; the executor (`service/executor.py`) validates the
input, runs the tool and turns what it returns or raises into events.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, NamedTuple, TypeVar

from pydantic import BaseModel

from tools.policy import SideEffects, ToolPolicy

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


class CallInfo(NamedTuple):
    """The tool call an attempt belongs to, as `current_call()` tells the tool running it. A named tuple rather than
    a frozen dataclass: one is made per attempt, and it builds in a fifth of the time.

    `idempotency_key` names the call, not the attempt: every retry of the call and its fallback see the same key,
    and so will a process that recovers the run after a crash. A tool with side effects passes it to whatever it
    changes (`http_request` sends it as the `Idempotency-Key` header), so that a repeat is recognised there.
    `attempt` counts the attempts of the tool running, from 1 (a fallback starts again at 1), as `tool_retry`
    events do.
    """

    run_id: str
    call_id: str
    attempt: int = 1

    @property
    def idempotency_key(self) -> str:
        return f"{self.run_id}:{self.call_id}"


# Set by the executor around each attempt (`service/policy/attempt.py`), never by a tool. A context variable rather
# than an argument of `run`, so that no tool's signature changes; `asyncio.to_thread` copies it into the thread.
CURRENT_CALL: ContextVar[CallInfo | None] = ContextVar("tool_call", default=None)


def current_call() -> CallInfo | None:
    """The call the running tool works for, or None outside the executor (a tool called directly, in a test)."""
    return CURRENT_CALL.get()


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

    def side_effects_of(self, args: InputT, declared: SideEffects) -> SideEffects:
        """What this call may change, when the tool can tell from its input better than its policy's
        `side_effects` (`declared`, after `policies.<name>` overrides it): `http_request` answers "none" for a GET.
        Whether a call cut off by a crash may be run again follows from it (`service/policy/repeat.py`)."""
        return declared

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
