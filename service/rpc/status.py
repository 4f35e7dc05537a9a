"""The one map from the service's errors to a call's gRPC status: an `errors.AgentError` ends the call with the status
its `code` names and its message. Handlers raise; `unary` and `streaming` catch at the boundary.

The status is set rather than raised with `context.abort`: grpc keeps the exception abort raises, and with it the
handler's frames, in a reference cycle that only the collector frees (tests/test_gc_hygiene.py).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc

from service.errors import AgentError

MAX_DETAILS = 2000  # characters of a status message

_S = TypeVar("_S")
_Q = TypeVar("_Q")
_R = TypeVar("_R")


def end_call(context: grpc.aio.ServicerContext, code: str, message: str) -> None:
    """End the call with the status named `code` (a gRPC status code name, as errors and `error` events carry it)
    and `message`; the handler then returns (None for a unary call: grpc sends no message with a status that is
    not OK)."""
    context.set_code(grpc.StatusCode[code])
    # the details travel in the trailers, which grpc clients refuse past 8 KiB by default (the call would then fail
    # with RESOURCE_EXHAUSTED instead of this status); a message quoting what the caller sent could be longer
    context.set_details(message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 1] + "…")


def refuse(context: grpc.aio.ServicerContext, error: AgentError) -> None:
    end_call(context, error.code, error.message)


def unary(
    handler: Callable[[_S, _Q, grpc.aio.ServicerContext], Awaitable[_R]],
) -> Callable[[_S, _Q, grpc.aio.ServicerContext], Awaitable[_R | None]]:
    """A unary-response handler whose AgentErrors end the call with their status."""

    @functools.wraps(handler)
    async def handle(self: _S, request: _Q, context: grpc.aio.ServicerContext) -> _R | None:
        try:
            return await handler(self, request, context)
        except AgentError as exc:
            refuse(context, exc)
            return None

    return handle


def streaming(
    opener: Callable[[_S, _Q, grpc.aio.ServicerContext], AsyncIterator[_R]],
) -> Callable[[_S, _Q, grpc.aio.ServicerContext], AsyncIterator[_R]]:
    """A response-streaming handler from `opener`, a plain function that checks the request and returns the stream:
    an AgentError it raises, or the stream raises, ends the call with its status. The stream is iterated here, in the
    one generator grpc sees, so this costs no extra hop per message."""

    @functools.wraps(opener)
    async def handle(self: _S, request: _Q, context: grpc.aio.ServicerContext) -> AsyncIterator[_R]:
        try:
            async for message in opener(self, request, context):
                yield message
        except AgentError as exc:
            refuse(context, exc)

    return handle
