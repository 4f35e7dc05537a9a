"""Request validation: a `RunAgentRequest` becomes a run's `RunSpec`, or a RequestError that says what to change."""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

from agent.v1 import agent_pb2 as pb
from service.callers import Caller
from service.config import Config, Limits
from service.errors import DurabilityUnavailable, InvalidRequest, PermissionDenied, ToolUnavailable
from service.loop import RunSpec
from tools.base import Tool

_ON_DISCONNECT = frozenset(pb.RunAgentRequest.OnDisconnect.values())
_DURABILITY = frozenset(pb.RunAgentRequest.Durability.values())


class Validator:
    """Checks requests against the config's limits, the server's tools and the caller's rights. `tools` are those
    that work here; `unavailable` says why each of the others does not."""

    def __init__(
        self,
        config: Config,
        tools: Mapping[str, Tool[Any]],
        unavailable: Mapping[str, str],
        default_model: str,
        *,
        durable: bool = False,
    ) -> None:
        """`durable`: whether this server checkpoints runs; without it no run is durable and a request that asks
        for one explicitly is refused, rather than given a run that would silently not survive a crash."""
        self.config = config
        self.tools = tools
        self.unavailable = unavailable
        self.default_model = default_model
        self.durable = durable
        self.models = frozenset(config.model.allowed)  # empty: any model

    def run_spec(
        self, request: pb.RunAgentRequest, run_id: str, caller: Caller, *, background: bool = False
    ) -> RunSpec:
        """The run `request` asks for, as `caller` may have it (`background`: through SubmitRun); InvalidRequest,
        PermissionDenied or ToolUnavailable saying what is wrong otherwise."""
        limits = self.config.limits
        runs = self.config.runs
        if not request.message.strip():
            raise InvalidRequest("message must not be empty: put the user's question in `message`")
        size = len(request.message.encode())
        if size > limits.max_message_bytes:
            raise InvalidRequest(f"message is {size} bytes; the limit is {limits.max_message_bytes} bytes")
        if request.HasField("system") and len(request.system.encode()) > limits.max_system_bytes:
            raise InvalidRequest(f"system is longer than {limits.max_system_bytes} bytes")
        tools = request.tools[:]  # each access to a repeated field builds a view: read it once (a slice: 2x list())
        down = sorted(set(tools) & self.unavailable.keys()) if self.unavailable else []
        if down:
            more = f" (so are {_some(down[1:])})" if len(down) > 1 else ""
            raise ToolUnavailable(f"tool {down[0]} is unavailable on this server: {self.unavailable[down[0]]}{more}")
        unknown = [name for name in tools if name not in self.tools]
        if unknown:
            # the caller's tools only, as ListTools lists them: the others' names are not for this caller to learn
            available = ", ".join(name for name in self.tools if caller.may_use(name)) or "none"
            raise InvalidRequest(f"unknown tool(s): {_some(unknown)}; available: {available} (see ListTools)")
        if len(set(tools)) != len(tools):
            twice = sorted(name for name, n in Counter(tools).items() if n > 1)  # linear: tools may be 100,000 long
            raise InvalidRequest(f"tools lists {_some(twice)} more than once")
        denied = [name for name in tools if not caller.may_use(name)]
        if denied:
            raise PermissionDenied(f"caller {caller.name} may not use tool(s): {_some(denied)}")
        max_turns = request.max_turns if request.HasField("max_turns") else limits.default_max_turns
        if not 1 <= max_turns <= limits.max_turns:
            raise InvalidRequest(f"max_turns must be between 1 and {limits.max_turns}, got {max_turns}")
        max_tokens = request.max_tokens if request.HasField("max_tokens") else self.config.model.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        if request.on_disconnect not in _ON_DISCONNECT:
            raise InvalidRequest(f"unknown on_disconnect {request.on_disconnect}: CANCEL or CONTINUE")
        if request.durability not in _DURABILITY:
            raise InvalidRequest(f"unknown durability {request.durability}: DURABLE or NOT_DURABLE (unset: default)")
        if request.durability == pb.RunAgentRequest.DURABLE and not self.durable:
            raise DurabilityUnavailable(
                "durability DURABLE: this server does not checkpoint runs yet, so the run would not survive a crash; "
                "send NOT_DURABLE or leave durability unset"
            )
        key_bytes = len(request.idempotency_key.encode())
        if key_bytes > limits.max_idempotency_key_bytes:
            raise InvalidRequest(
                f"idempotency_key is {key_bytes} bytes; the limit is {limits.max_idempotency_key_bytes} bytes"
            )
        model = self._model(request)
        metadata = _checked_metadata(request, limits)
        return RunSpec(
            run_id=run_id,
            message=request.message,
            model=model,
            system=request.system if request.HasField("system") else self.config.system_prompt,
            max_turns=max_turns,
            max_tokens=max_tokens,
            tools=tuple(tools) or tuple(t for t in self.tools if caller.may_use(t)),
            # the authenticated caller, for logs, spans and audit records; it overrides a "caller" the request sent
            metadata={**metadata, "caller": caller.name},
            max_tool_calls=self._limit(request, "max_tool_calls", runs.max_tool_calls),
            max_output_tokens=self._limit(request, "max_output_tokens", runs.max_output_tokens),
            durable=self.durable and durable(request, background=background, default=caller.config.durability),
        )

    def _model(self, request: pb.RunAgentRequest) -> str:
        """The run's model: the one the request names, bounded and on `model.allowed` when that lists any, else the
        server's default."""
        model: str = request.model
        if not model:
            return self.default_model
        model_bytes = len(model.encode())
        if model_bytes > self.config.limits.max_model_bytes:  # it goes into logs, spans and the model request
            raise InvalidRequest(
                f"model is {model_bytes} bytes; a model id has at most {self.config.limits.max_model_bytes} bytes "
                f"(leave it empty for the server's default)"
            )
        if self.models and model not in self.models:
            raise InvalidRequest(
                f"model {model!r} is not allowed on this server; allowed: {_some(sorted(self.models))} "
                f"(leave it empty for the server's default, {self.default_model})"
            )
        return model

    @staticmethod
    def _limit(request: pb.RunAgentRequest, name: str, maximum: int) -> int:
        if not request.HasField(name):
            return maximum
        value = int(getattr(request, name))
        if not 1 <= value <= maximum:
            raise InvalidRequest(f"{name} must be between 1 and {maximum}, got {value}")
        return value


def durable(request: pb.RunAgentRequest, *, background: bool, default: str | None = None) -> bool:
    """Whether the run is checkpointed: as asked, else as the caller's `durability` says, else when it outlives its
    call (CONTINUE, SubmitRun), whose caller is not there to retry it when the server dies."""
    if request.durability != pb.RunAgentRequest.DURABILITY_UNSPECIFIED:
        return bool(request.durability == pb.RunAgentRequest.DURABLE)
    if default is not None:
        return default == "durable"
    return background or bool(request.on_disconnect == pb.RunAgentRequest.CONTINUE)


def _some(names: list[str], shown: int = 10) -> str:
    """The first names, for a message that goes back in the call's trailers: grpc clients refuse trailers of more
    than 8 KiB by default, and a request may list thousands of names."""
    text = ", ".join(name[:100] for name in names[:shown])
    return text if len(names) <= shown else f"{text} and {len(names) - shown} more"


def _checked_metadata(request: pb.RunAgentRequest, limits: Limits) -> dict[str, str]:
    if not request.metadata:  # most requests send none: testing is 6x cheaper than copying the empty map
        return {}
    metadata = dict(request.metadata)
    if len(metadata) > limits.max_metadata_entries:
        raise InvalidRequest(f"metadata has {len(metadata)} entries; the limit is {limits.max_metadata_entries}")
    total = 0
    for key, value in metadata.items():
        if not key:
            raise InvalidRequest("metadata has an empty key")
        k, v = len(key.encode()), len(value.encode())
        if max(k, v) > limits.max_metadata_value_bytes:
            raise InvalidRequest(
                f"metadata entry {key[:40]!r} is {max(k, v)} bytes; keys and values may have at most "
                f"{limits.max_metadata_value_bytes} bytes"
            )
        total += k + v
    if total > limits.max_metadata_bytes:
        raise InvalidRequest(f"metadata is {total} bytes; the limit is {limits.max_metadata_bytes} bytes")
    return metadata


def fingerprint(request: pb.RunAgentRequest) -> str:
    """What an idempotency key promises: the same request. Deterministic serialization, hashed."""
    return hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
