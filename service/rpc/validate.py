"""Request validation: a `RunAgentRequest` becomes a run's `RunSpec`, or a RequestError that says what to change."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from typing import Any

from agent.v1 import agent_pb2 as pb
from service.callers import Caller
from service.config import Config, Limits, RunsConfig
from service.errors import DurabilityUnavailable, InvalidRequest, PermissionDenied, ToolUnavailable
from service.loop import RunSpec
from tools.base import Tool

_ON_DISCONNECT = frozenset(pb.RunAgentRequest.OnDisconnect.values())
_DURABILITY = frozenset(pb.RunAgentRequest.Durability.values())
_UNSPECIFIED, _DURABLE = pb.RunAgentRequest.DURABILITY_UNSPECIFIED, pb.RunAgentRequest.DURABLE
_CONTINUE = pb.RunAgentRequest.CONTINUE


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
        one_model: bool = False,
    ) -> None:
        """`durable`: whether this server checkpoints runs; without it no run is durable and a request that asks
        for one explicitly is refused, rather than given a run that would silently not survive a crash.
        `one_model`: the server's model serves every request itself, whatever it names (the offline scripted
        model): a request's model is checked as any other, and the run, its run_started event included, says the
        model that answers it."""
        self.config = config
        self.tools = tools
        self.unavailable = unavailable
        self.default_model = default_model
        self.durable = durable
        self.one_model = one_model
        self.models = frozenset(config.model.allowed)  # empty: any model
        self.limits, self.runs = config.limits, config.runs

    def run_spec(
        self, request: pb.RunAgentRequest, run_id: str, caller: Caller, *, background: bool = False
    ) -> RunSpec:
        """The run `request` asks for, as `caller` may have it (`background`: through SubmitRun); InvalidRequest,
        PermissionDenied or ToolUnavailable saying what is wrong otherwise."""
        # A read of a request's field costs about 800 instructions (upb looks the field up by name and builds the
        # value), a HasField about 500: each field is read once, into a local, and an unset optional one not at all.
        limits, runs = self.limits, self.runs
        has = request.HasField
        message = request.message
        if not message.strip():
            raise InvalidRequest("message must not be empty: put the user's question in `message`")
        size = len(message.encode())
        if size > limits.max_message_bytes:
            raise InvalidRequest(f"message is {size} bytes; the limit is {limits.max_message_bytes} bytes")
        system = request.system if has("system") else None
        if system is not None and len(system.encode()) > limits.max_system_bytes:
            raise InvalidRequest(f"system is longer than {limits.max_system_bytes} bytes")
        tools = request.tools[:]  # each access to a repeated field builds a view: read it once (a slice: 2x list())
        if tools:
            self._check_tools(tools, caller)
        max_turns = request.max_turns if has("max_turns") else limits.default_max_turns
        if not 1 <= max_turns <= limits.max_turns:
            raise InvalidRequest(f"max_turns must be between 1 and {limits.max_turns}, got {max_turns}")
        max_tokens = request.max_tokens if has("max_tokens") else self.config.model.max_tokens
        if not 1 <= max_tokens <= limits.max_tokens:
            raise InvalidRequest(f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        on_disconnect, durability = request.on_disconnect, request.durability
        self._check_modes(on_disconnect, durability)
        key = request.idempotency_key
        key_bytes = len(key.encode()) if key else 0
        if key_bytes > limits.max_idempotency_key_bytes:
            raise InvalidRequest(
                f"idempotency_key is {key_bytes} bytes; the limit is {limits.max_idempotency_key_bytes} bytes"
            )
        model = request.model
        named = self._model(model) if model else ""  # checked even where the one model answers anyway
        sent = request.metadata
        # a fresh dict, the caller's name added in place; most requests send none, and testing the map is 6x
        # cheaper than copying it empty
        metadata = _checked_metadata(sent, limits) if sent else {}
        # the authenticated caller, for logs, spans and audit records; it overrides a "caller" the request sent
        metadata["caller"] = caller.name
        max_tool_calls = _limit(request, "max_tool_calls", runs) if has("max_tool_calls") else runs.max_tool_calls
        max_output_tokens = (
            _limit(request, "max_output_tokens", runs) if has("max_output_tokens") else runs.max_output_tokens
        )
        if not background and has("callback"):  # here, not in `AgentApi.start`: `has` is bound already (1,200 less)
            raise InvalidRequest("callback is for SubmitRun only: a streaming call sees the run's end itself")
        return RunSpec(
            run_id=run_id,
            message=message,
            model=self.default_model if self.one_model or not model else named,
            system=self.config.system_prompt if system is None else system,
            max_turns=max_turns,
            max_tokens=max_tokens,
            tools=tuple(tools) or tuple(t for t in self.tools if caller.may_use(t)),
            metadata=metadata,
            max_tool_calls=max_tool_calls,
            max_output_tokens=max_output_tokens,
            durable=self.durable and durable(durability, on_disconnect, background, caller.config.durability),
        )

    def _check_tools(self, tools: list[str], caller: Caller) -> None:
        """Each tool the request lists works here, is listed once and is the caller's to use. One pass over the
        list when they are (the usual request), the checks one by one, saying which tools fail, when not."""
        known, may_use = self.tools, caller.may_use
        for name in tools:  # a loop, not all() over a generator, which would cost more than the checks
            if name not in known or not may_use(name):
                break
        else:
            if len(set(tools)) == len(tools):
                return
        if "" in tools:
            raise InvalidRequest(f"tools[{tools.index('')}] is an empty name: list tools by name (see ListTools)")
        down = sorted(set(tools) & self.unavailable.keys()) if self.unavailable else []
        if down:
            more = f" (so are {_some(down[1:])})" if len(down) > 1 else ""
            raise ToolUnavailable(f"tool {down[0]} is unavailable on this server: {self.unavailable[down[0]]}{more}")
        unknown = [name for name in tools if name not in known]
        if unknown:
            # the caller's tools only, as ListTools lists them: the others' names are not for this caller to learn
            available = ", ".join(name for name in known if may_use(name)) or "none"
            raise InvalidRequest(f"unknown tool(s): {_some(unknown)}; available: {available} (see ListTools)")
        if len(set(tools)) != len(tools):
            twice = sorted(name for name, n in Counter(tools).items() if n > 1)  # linear: tools may be 100,000 long
            raise InvalidRequest(f"tools lists {_some(twice)} more than once")
        denied = [name for name in tools if not may_use(name)]  # what is left of the pass's failures
        raise PermissionDenied(f"caller {caller.name} may not use tool(s): {_some(denied)}")

    def _check_modes(self, on_disconnect: int, durability: int) -> None:
        if on_disconnect not in _ON_DISCONNECT:
            raise InvalidRequest(f"unknown on_disconnect {on_disconnect}: CANCEL or CONTINUE")
        if durability not in _DURABILITY:
            raise InvalidRequest(f"unknown durability {durability}: DURABLE or NOT_DURABLE (unset: default)")
        if durability == _DURABLE and not self.durable:
            raise DurabilityUnavailable(
                "durability DURABLE: this server does not checkpoint runs yet, so the run would not survive a crash; "
                "send NOT_DURABLE or leave durability unset"
            )

    def _model(self, model: str) -> str:
        """The model a request names, bounded and on `model.allowed` when that lists any."""
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


def _limit(request: pb.RunAgentRequest, name: str, runs: RunsConfig) -> int:
    """The request's `name`, set, within the bound the config's field of that name sets."""
    maximum: int = getattr(runs, name)
    value = int(getattr(request, name))
    if not 1 <= value <= maximum:
        raise InvalidRequest(f"{name} must be between 1 and {maximum}, got {value}")
    return value


def durable(durability: int, on_disconnect: int, background: bool, default: str | None = None) -> bool:
    """Whether the run is checkpointed: as asked (`durability`), else as the caller's `durability` (`default`) says,
    else when it outlives its call (CONTINUE, SubmitRun), whose caller is not there to retry it when the server dies."""
    if durability != _UNSPECIFIED:
        return bool(durability == _DURABLE)
    if default is not None:
        return default == "durable"
    return background or bool(on_disconnect == _CONTINUE)


def _some(names: list[str], shown: int = 10) -> str:
    """The first names, for a message that goes back in the call's trailers: grpc clients refuse trailers of more
    than 8 KiB by default, and a request may list thousands of names."""
    text = ", ".join(name if len(name) <= 100 else f"{name[:99]}…" for name in names[:shown])
    return text if len(names) <= shown else f"{text} and {len(names) - shown} more"


def _checked_metadata(sent: Mapping[str, str], limits: Limits) -> dict[str, str]:
    metadata = dict(sent)
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


def fingerprint(spec: RunSpec, request: pb.RunAgentRequest) -> str:
    """What an idempotency key promises: the same request, as the run it asks for, not as its bytes: the same tools
    in another order, or a default sent explicitly (max_turns 10 where unset means 10), ask for the same run (an
    outside finding: both were ALREADY_EXISTS). The run's id is left out, and so is its durability as resolved (it
    depends on the RPC: the same request sent to RunAgent and SubmitRun names one run); the request's own
    durability, on_disconnect and a SubmitRun's callback are added."""
    run = spec.to_json()
    del run["run_id"], run["durable"]
    run["tools"] = sorted(run["tools"])
    run["on_disconnect"], run["durability"] = request.on_disconnect, request.durability
    if request.HasField("callback"):
        run["callback"] = [request.callback.url, request.callback.secret]
    return hashlib.sha256(json.dumps(run, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
