"""Server interceptors and the one helper they share: wrapping a handler of any call shape so that a check runs
before it. A response-streaming handler is either an async generator (it yields its messages: ours) or a coroutine
that sends them with `context.write` (grpcio-health-checking's `Watch`); a wrapper must keep the handler's style,
since grpc.aio tells the two apart by the function it is given. The other shapes are coroutines.

`RejectUndecodable` answers a request whose bytes are not a valid message with INVALID_ARGUMENT (grpc's default is
UNKNOWN with "Unexpected DecodeError", which tells the caller nothing it can act on).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from service import telemetry
from service.errors import AgentError, InvalidRequest
from service.rpc.accept import AcceptAhead
from service.rpc.status import refuse

# A check on a call before its handler runs: None to let it through, else the error to end the call with.
Check = Callable[[Any, grpc.aio.ServicerContext], AgentError | None]


_HANDLER_KINDS: tuple[tuple[str, Callable[..., grpc.RpcMethodHandler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)


def wrap_handler(
    handler: grpc.RpcMethodHandler, check: Check, *, request_deserializer: Callable[[bytes], Any] | None = None
) -> grpc.RpcMethodHandler:
    """`handler` with `check(request, context)` before it: a refusal ends the call with its status.
    For client-streaming shapes `request` is the request iterator. A handler this function already wrapped gets one
    wrapper running both checks, this one first, rather than a wrapper around a wrapper: each layer would cost every
    call an extra generator, and every streamed message an extra hop through it."""
    for kind, make in _HANDLER_KINDS:
        inner = getattr(handler, kind)
        if inner is None:
            continue
        checks: tuple[Check, ...] = (check,)
        guarded = getattr(inner, "_guarded", None)
        if guarded is not None:
            inner, earlier = guarded
            checks += earlier
        streams_by_yield = kind.endswith("_stream") and inspect.isasyncgenfunction(inner)
        own = getattr(inner, "with_checks", None) if streams_by_yield and inspect.ismethod(inner) else None
        wrapped: Any
        if own is not None:  # a run's stream (`runstream.run_stream`) runs the checks itself: no layer per message
            wrapped = own(inner.__self__, checks)
            wrapped.__func__._guarded = (inner, checks)
        else:
            wrapped = _streaming(inner, checks) if streams_by_yield else _unary(inner, checks)
            wrapped._guarded = (inner, checks)
        return make(wrapped, request_deserializer or handler.request_deserializer, handler.response_serializer)
    return handler


def _streaming(inner: Any, checks: tuple[Check, ...]) -> Any:
    async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
        for check in checks:
            refusal = check(request, context)
            if refusal is not None:
                refuse(context, refusal)
                return
        async for response in inner(request, context):
            yield response

    return streaming


def _unary(inner: Any, checks: tuple[Check, ...]) -> Any:
    """For unary responses, and for streaming handlers that write with `context.write` and return None."""

    async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        for check in checks:
            refusal = check(request, context)
            if refusal is not None:
                refuse(context, refusal)
                return None
        return await inner(request, context)

    return unary


class WrapCache:
    """Wrapped handlers by method, so that a call reuses the wrapper built for the first call of its method instead of
    building closures and a handler each time. A changed inner handler (a server rebuilt in tests) is wrapped anew."""

    def __init__(self) -> None:
        self._by_method: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(
        self, method: str, handler: grpc.RpcMethodHandler, build: Callable[[], grpc.RpcMethodHandler]
    ) -> grpc.RpcMethodHandler:
        cached = self._by_method.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = build()
        self._by_method[method] = (handler, wrapped)
        return wrapped


class _Undecodable:
    def __init__(self, error: str) -> None:
        self.error = error


class RejectUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self) -> None:
        self._wrapped = WrapCache()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        return self.guard(details.method, await continuation(details))

    def guard(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        return self._wrapped.get(method, handler, lambda: _tolerant(handler, method))


class Registrar:
    """Stands in for the server in grpc's `add_*_to_server` functions, registering each handler already wrapped by the
    interceptors' `guard(method, handler)`, in the order grpc would wrap it (the first interceptor outermost). The
    server then has no interceptor for grpc.aio to await on every call: its chain, each `intercept_service` and the
    wrapper's look-up cost about 18,000 instructions a call with our two (docs/performance-log.md, fifth pass)."""

    def __init__(self, server: AcceptAhead, guards: Sequence[Any]) -> None:
        self.server = server
        self.guards = tuple(reversed(guards))

    def guard(self, method: str, handler: grpc.RpcMethodHandler | None) -> grpc.RpcMethodHandler | None:
        for guard in self.guards:
            handler = guard.guard(method, handler)
        return handler

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(tuple(_Guarded(h, self) for h in handlers))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        guarded = {name: self.guard(f"/{service}/{name}", handler) for name, handler in handlers.items()}
        self.server.add_registered_method_handlers(service, guarded)


class _Guarded(grpc.GenericRpcHandler):  # type: ignore[misc]
    def __init__(self, inner: grpc.GenericRpcHandler, registrar: Registrar) -> None:
        self.inner = inner
        self.registrar = registrar

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler | None:
        return self.registrar.guard(details.method, self.inner.service(details))


def guarded_server(
    interceptors: Sequence[Any], options: Sequence[tuple[str, Any]], accept_ahead: int = 0, services: Sequence[str] = ()
) -> tuple[grpc.aio.Server, Any, AcceptAhead]:
    """A server for `interceptors`, what to register its services with, and the `AcceptAhead` that keeps
    `accept_ahead` more requests for new calls outstanding on each method of `services` once started. The guards
    are set at registration when every interceptor can set one (`Registrar`); otherwise (tracing's) grpc runs them
    all on every call, as it would."""
    if all(hasattr(i, "guard") for i in interceptors):
        server = grpc.aio.server(options=list(options))
        accept = AcceptAhead(server, accept_ahead, services)
        return server, Registrar(accept, interceptors), accept
    server = grpc.aio.server(interceptors=list(interceptors), options=list(options))
    accept = AcceptAhead(server, accept_ahead, services, interceptors)
    return server, accept, accept


def _tolerant(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    """`handler` with a deserializer that hands undecodable bytes on as `_Undecodable`, refused before the call."""
    parse = handler.request_deserializer

    def tolerant(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as exc:
            return _Undecodable(str(exc))

    def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> AgentError | None:
        if isinstance(request, _Undecodable):
            return InvalidRequest(f"request is not a valid {method} message: {request.error}")
        return None

    return wrap_handler(handler, refuse_undecodable, request_deserializer=tolerant)


def tracing_interceptors() -> list[Any]:
    """The OpenTelemetry gRPC server interceptor when tracing is on (an RPC span, parent of `run`); none otherwise."""
    provider = telemetry.tracer_provider()
    if provider is None:
        return []
    from opentelemetry.instrumentation.grpc import aio_server_interceptor

    return [aio_server_interceptor(tracer_provider=provider)]  # type: ignore[no-untyped-call]
