"""One attempt at a tool call under its timeout: the tool's chunks as events, then an `Outcome` saying how it ended.

`hard` timeout: the call is cancelled and the outcome is `timeout`. `soft`: a streaming tool that has yielded
chunks ends `partial` with them (nothing yielded: `timeout`, as with hard). The deadline covers the whole attempt,
but only the awaits on the tool sit inside `asyncio.timeout`, never a `yield`: a timeout firing while the consumer
holds an event would otherwise cancel the consumer instead of the tool.

The timer is armed only once the tool suspends (`bounded`): an await that completes in its first step never lets
the loop run, so no timer could have fired during it, and a tool that answers from memory is spared the timer's
handle, its heap entry and its cancel (about an eighth of the executor's instructions per call). The deadline is
still taken before the first step, so a tool that suspends later has exactly the time it had before.

The tool runs with `tools.base.current_call()` telling it its call. The context variable is set only around the
awaits on the tool, never across a `yield` either: set there, it would leak into the consumer's code.
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
import types
from collections.abc import AsyncIterator, Awaitable, Generator
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from service.events import ToolResultChunk, ToolStatus
from tools.base import CURRENT_CALL, JSON, CallInfo, Tool, ToolError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(slots=True)
class Outcome:
    """How an attempt (or a whole call) ended, with what the dead-letter store needs when it failed."""

    status: ToolStatus
    data: Any = None
    error: str = ""
    retryable: bool = False
    error_type: str = ""
    traceback: str = ""
    attempts: int = 0
    cache_hit: bool = False
    answered_by: str = ""  # the fallback that answered in the tool's place

    @property
    def ok(self) -> bool:
        return self.status in (ToolStatus.OK, ToolStatus.PARTIAL)


class ChunkCounter:
    """Numbers a call's chunks across retries and the fallback, so indexes never repeat within a call."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def next(self) -> int:
        self.n += 1
        return self.n - 1


async def attempt(tool: Tool[Any], args: Any, *, call: CallInfo, timeout_s: float, retry_timeouts: bool) -> Outcome:
    """One attempt at a tool that answers in one piece. A coroutine, not a generator: with nothing to stream, the
    common call is spared a generator layer on its way through the stages."""
    token = CURRENT_CALL.set(call)
    try:
        data = to_json(await bounded(tool.run(args), asyncio.get_running_loop().time() + timeout_s))
    except Exception as exc:
        return _failed(exc, tool, call_id=call.call_id, timeout_s=timeout_s, retry_timeouts=retry_timeouts)
    finally:
        CURRENT_CALL.reset(token)
    return Outcome(ToolStatus.OK, data=data)


async def attempt_stream(
    tool: Tool[Any],
    args: Any,
    *,
    call: CallInfo,
    timeout_s: float,
    mode: Literal["hard", "soft"],
    retry_timeouts: bool,
    counter: ChunkCounter,
) -> AsyncIterator[ToolResultChunk | Outcome]:
    """One attempt at a streaming tool: its chunks as events, then the Outcome."""
    call_id = call.call_id
    chunks: list[JSON] = []
    try:
        total = tool.total_chunks(args)
        deadline = asyncio.get_running_loop().time() + timeout_s
        stream = tool.stream(args)
        try:
            while True:
                token = CURRENT_CALL.set(call)  # each step of the tool's generator runs in this context
                try:
                    chunk = to_json(await bounded(anext(stream), deadline))
                except StopAsyncIteration:
                    break
                finally:
                    CURRENT_CALL.reset(token)
                chunks.append(chunk)
                yield ToolResultChunk(call_id=call_id, index=counter.next(), total=total, data=chunk)
        finally:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                token = CURRENT_CALL.set(call)  # the generator's own `finally` may still want its call
                try:
                    await aclose()
                finally:
                    CURRENT_CALL.reset(token)
    except Exception as exc:
        if isinstance(exc, TimeoutError) and mode == "soft" and chunks:
            yield Outcome(
                ToolStatus.PARTIAL,
                data=chunks,
                error=f"{tool.name} stopped after {timeout_s:g} s with {len(chunks)} chunk(s); the rest is missing",
            )
        else:
            yield _failed(exc, tool, call_id=call_id, timeout_s=timeout_s, retry_timeouts=retry_timeouts)
    else:
        yield Outcome(ToolStatus.OK, data=chunks)


async def bounded(awaitable: Awaitable[T], deadline: float) -> T:
    """`await awaitable` under `asyncio.timeout_at(deadline)`, the timer armed only if it suspends (module docstring).
    Its first step runs here; the rest, if any, is handed to the task under the timeout."""
    steps = awaitable.__await__()
    try:
        pending = steps.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    async with asyncio.timeout_at(deadline):
        return await _rest(steps, pending)


@types.coroutine
def _rest(steps: Generator[Any, Any, T], pending: Any) -> Generator[Any, Any, T]:
    """As `yield from steps` would go on after its first step yielded `pending` (a future, or None for a bare
    yield): the task's answer, or the exception it throws in (a cancel, the timeout's), goes to `steps`."""
    while True:
        try:
            sent = yield pending
        except GeneratorExit:
            steps.close()
            raise
        except BaseException as exc:
            try:
                pending = steps.throw(exc)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            continue
        if sent is None:  # what a task always sends: plain delegation from here on
            return (yield from steps)
        try:
            pending = steps.send(sent)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _failed(exc: Exception, tool: Tool[Any], *, call_id: str, timeout_s: float, retry_timeouts: bool) -> Outcome:
    """How an attempt that raised `exc` ended. Called inside the `except` block: the traceback is the current one."""
    if isinstance(exc, TimeoutError):
        return Outcome(
            ToolStatus.TIMEOUT,
            error=f"{tool.name} did not finish within {timeout_s:g} s",
            retryable=retry_timeouts,
            error_type="TimeoutError",
        )
    if isinstance(exc, ToolError):
        return Outcome(
            ToolStatus.ERROR,
            error=exc.message,
            retryable=exc.retryable,
            error_type="ToolError",
            traceback=traceback.format_exc(),
        )
    # a bug in the tool: the model gets an error result, the operator a traceback
    log.exception("tool %s raised", tool.name, extra={"call_id": call_id})
    return Outcome(
        ToolStatus.ERROR,
        error=f"internal error in tool {tool.name}: {type(exc).__name__}",
        error_type=type(exc).__name__,
        traceback=traceback.format_exc(),
    )


def to_json(value: Any) -> JSON:
    """A tool's value made JSON-safe (protobuf Struct/Value take only JSON types): dates and the like as strings.
    Values that already are JSON (the usual case) are returned as they are, without a serialisation round trip."""
    if _is_json(value):
        return value
    return json.loads(json.dumps(value, default=str))


def _is_json(value: Any) -> bool:
    # leaves are checked in the loops, not by a call each (a result's values are mostly leaves), and the loops are
    # plain: half the instructions of all() over generators on a 50-row result
    kind = type(value)
    if value is None or kind in _SCALARS:
        return True
    if kind is dict:
        for k, v in value.items():
            if type(k) is not str or not (v is None or type(v) in _SCALARS or _is_json(v)):
                return False
        return True
    if kind is list:
        for v in value:  # noqa: SIM110  (a loop, not all() over a generator: a frame less per list)
            if not (v is None or type(v) in _SCALARS or _is_json(v)):
                return False
        return True
    return False


_SCALARS = frozenset({str, bool, int, float})
