"""The one map from the service's errors to a call's gRPC status: an `errors.AgentError` ends the call with the status
its `code` names and its message. Handlers raise; `unary` and `streaming` catch at the boundary. Any other exception
is a bug: it is logged with its traceback and the call ends with INTERNAL (grpc's default would be UNKNOWN, with the
exception's class in the message), as the HTTP face answers one.

The status is set rather than raised with `context.abort`: grpc keeps the exception abort raises, and with it the
handler's frames, in a reference cycle that only the collector frees (tests/test_gc_hygiene.py).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from service.errors import DOMAIN, AgentError

log = logging.getLogger(__name__)

MAX_DETAILS = 2000  # characters of a status message
DETAILS_KEY = "grpc-status-details-bin"  # where grpc carries a google.rpc.Status (grpcio-status reads it)
INTERNAL_MESSAGE = "internal error: the server failed on this call (a bug); its log has the traceback"

_S = TypeVar("_S")
_Q = TypeVar("_Q")
_R = TypeVar("_R")


def end_call(
    context: grpc.aio.ServicerContext, code: str, message: str, *, reason: str | None = None, retryable: bool = False
) -> None:
    """End the call with the status named `code` (a gRPC status code name, as errors and `error` events carry it)
    and `message`; the handler then returns (None for a unary call: grpc sends no message with a status that is
    not OK). With a `reason`, the trailers also carry the status as a `google.rpc.Status` whose one detail is an
    `ErrorInfo` (reason, domain "agent.v1", metadata retryable "true"/"false"), as the HTTP face's JSON errors do: a
    program tells RUN_HANDED_OVER from STATE_STORE_UNAVAILABLE without parsing the message
    (`grpc_status.rpc_status.from_call` reads it)."""
    status = grpc.StatusCode[code]
    # the details travel in the trailers, which grpc clients refuse past 8 KiB by default (the call would then fail
    # with RESOURCE_EXHAUSTED instead of this status); a message quoting what the caller sent could be longer
    text = message if len(message) <= MAX_DETAILS else message[: MAX_DETAILS - 1] + "…"
    context.set_code(status)
    context.set_details(text)
    if reason is not None:
        info = error_details_pb2.ErrorInfo(
            reason=reason, domain=DOMAIN, metadata={"retryable": "true" if retryable else "false"}
        )
        detail = any_pb2.Any()
        detail.Pack(info)
        rich = status_pb2.Status(code=status.value[0], message=text, details=[detail])
        context.set_trailing_metadata(((DETAILS_KEY, rich.SerializeToString()),))


def refuse(context: grpc.aio.ServicerContext, error: AgentError) -> None:
    end_call(context, error.code, error.message, reason=error.reason, retryable=error.retryable)


def fail(context: grpc.aio.ServicerContext, handler: str) -> None:
    """End the call with INTERNAL for the exception being handled, a bug: logged with its traceback."""
    log.exception("call failed: a bug", extra={"handler": handler})
    end_call(context, "INTERNAL", INTERNAL_MESSAGE)


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
        except Exception:
            fail(context, handler.__qualname__)
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
        except Exception:
            fail(context, opener.__qualname__)

    return handle


class UnknownMethods(grpc.GenericRpcHandler):  # type: ignore[misc]
    """Answers a method this server does not have with UNIMPLEMENTED and an ErrorInfo (METHOD_NOT_FOUND), as every
    other refusal: grpc's own answer carries no details (an outside finding). Registered last, so it is asked only
    about a method no service here has; a stream-stream handler that reads nothing fits a call of any arity."""

    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        method = str(handler_call_details.method)

        async def refuse_unknown(requests: object, context: grpc.aio.ServicerContext) -> None:
            end_call(
                context,
                "UNIMPLEMENTED",
                f"no method {method[:200]} on this server (reflection lists the services)",
                reason="METHOD_NOT_FOUND",
            )

        return grpc.stream_stream_rpc_method_handler(refuse_unknown)
