"""Runs one tool call and yields its events: `tool_call_ready`, any `tool_result_chunk`s, then one `tool_result`.

Whatever the tool does (bad input, `ToolError`, a bug, a hang), the call ends in a `ToolResult` the model can read;
only cancellation of the run propagates. Policies (rate limits, breakers, retries, fallbacks) wrap this core.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from service import telemetry
from service.events import Event, ToolCallReady, ToolResult, ToolResultChunk, ToolStatus
from tools.base import JSON, Tool, ToolError

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunContext:
    """What the executor knows of the run a call belongs to: for audit, dead-letter, logs and budgets."""

    run_id: str
    offered: frozenset[str]
    metadata: Mapping[str, str] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)  # tools that have returned OK in this run


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallRequest:
    """One tool_use block of a model turn. `parse_error` is set when the model's input JSON did not parse."""

    call_id: str
    name: str
    input: dict[str, Any]
    parse_error: str | None = None


class Executor:
    """Executes tool calls against a fixed set of tools, each call under a hard timeout."""

    def __init__(
        self,
        tools: Mapping[str, Tool[Any]],
        *,
        timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.tools = tools
        self.timeout_s = timeout_s
        self.clock = clock

    async def execute(self, call: ToolCallRequest, run: RunContext) -> AsyncIterator[Event]:
        started = self.clock()

        def result(status: ToolStatus, *, data: Any = None, error: str = "") -> ToolResult:
            elapsed = self.clock() - started
            telemetry.record_tool_call(call.name, status.value, elapsed)
            return ToolResult(
                call_id=call.call_id, name=call.name, status=status, duration_s=elapsed, data=data, error=error
            )

        offered = run.offered
        tool = self.tools.get(call.name) if call.name in offered else None
        if tool is None:
            yield result(
                ToolStatus.REJECTED,
                error=f"unknown tool {call.name!r}; available tools: {', '.join(sorted(offered)) or 'none'}",
            )
            return
        if call.parse_error is not None:
            yield result(ToolStatus.REJECTED, error=f"tool input is not valid JSON: {call.parse_error}")
            return
        try:
            args = tool.validate(call.input)
        except ValidationError as exc:
            yield result(ToolStatus.REJECTED, error=f"invalid input for {call.name}: {describe(exc)}")
            return

        yield ToolCallReady(call_id=call.call_id, name=call.name, input=call.input)
        chunks: list[JSON] = []
        try:
            async with asyncio.timeout(self.timeout_s):
                if tool.streaming:
                    total = tool.total_chunks(args)
                    async for chunk in tool.stream(args):
                        chunk = to_json(chunk)
                        chunks.append(chunk)
                        yield ToolResultChunk(call_id=call.call_id, index=len(chunks) - 1, total=total, data=chunk)
                    data = chunks
                else:
                    data = to_json(await tool.run(args))
        except TimeoutError:
            yield result(ToolStatus.TIMEOUT, error=f"{call.name} did not finish within {self.timeout_s:g} s")
        except ToolError as exc:
            yield result(ToolStatus.ERROR, error=exc.message)
        except Exception as exc:  # a bug in the tool: the model gets an error result, the operator a traceback
            log.exception("tool %s raised", call.name, extra={"call_id": call.call_id})
            yield result(ToolStatus.ERROR, error=f"internal error in tool {call.name}: {type(exc).__name__}")
        else:
            yield result(ToolStatus.OK, data=data)


def describe(exc: ValidationError) -> str:
    """Pydantic errors as one line the model can act on: `limit: Input should be less than or equal to 1000`."""
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "input"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def to_json(value: Any) -> JSON:
    """A tool's value made JSON-safe (protobuf Struct/Value take only JSON types): dates and the like as strings."""
    if value is None or isinstance(value, str | bool | int | float):
        return value
    return json.loads(json.dumps(value, default=str))
