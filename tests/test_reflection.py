"""A client that knows the service only through server reflection (the way grpcurl works): no generated stubs."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def discover_and_run(port: int) -> tuple[list[str], list[dict[str, Any]]]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = list(database.get_services())
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("agent.v1.AgentService").FindMethodByName("RunAgent")
        assert method.server_streaming and not method.client_streaming
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        request = json_format.ParseDict({"message": "hello from reflection", "tools": ["echo"]}, request_cls())
        call = channel.unary_stream(
            f"/{method.containing_service.full_name}/{method.name}",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        events = [json_format.MessageToDict(e) for e in call(request, timeout=10)]
    return services, events


async def test_reflection_only_client_discovers_and_calls_run_agent(start_service: Any) -> None:
    svc = await start_service()
    services, events = await asyncio.to_thread(discover_and_run, svc.port)
    assert {"agent.v1.AgentService", "grpc.health.v1.Health"} <= set(services)
    assert "runStarted" in events[0] and "finalResponse" in events[-1]
    assert [int(e["seq"]) for e in events] == list(range(1, len(events) + 1))
    result = next(e["toolResult"] for e in events if "toolResult" in e)
    assert result["status"] == "TOOL_STATUS_OK" and result["data"] == {"echo": "hi"}


async def test_reflection_can_be_switched_off(start_service: Any) -> None:
    svc = await start_service(reflection=False)

    def services() -> list[str]:
        with grpc.insecure_channel(f"127.0.0.1:{svc.port}") as channel:
            return list(ProtoReflectionDescriptorDatabase(channel).get_services())

    try:
        found = await asyncio.to_thread(services)
    except grpc.RpcError as exc:
        assert exc.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]
    else:
        raise AssertionError(f"reflection answered: {found}")
