"""A server interceptor that answers a request whose bytes are not a valid message with INVALID_ARGUMENT (grpc's
default is UNKNOWN with "Unexpected DecodeError", which tells the caller nothing it can act on)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError


class _Undecodable:
    def __init__(self, error: str) -> None:
        self.error = error


class RejectUndecodable(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or handler.request_deserializer is None or handler.request_streaming:
            return handler
        parse = handler.request_deserializer
        method = details.method

        def tolerant(data: bytes) -> Any:
            try:
                return parse(data)
            except DecodeError as exc:
                return _Undecodable(str(exc))

        async def refuse(request: _Undecodable, context: grpc.aio.ServicerContext) -> None:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"request is not a valid {method} message: {request.error}"
            )

        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                if isinstance(request, _Undecodable):
                    await refuse(request, context)
                async for item in inner_stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(stream, tolerant, handler.response_serializer)
        inner_unary = handler.unary_unary

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if isinstance(request, _Undecodable):
                await refuse(request, context)
            return await inner_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary, tolerant, handler.response_serializer)
