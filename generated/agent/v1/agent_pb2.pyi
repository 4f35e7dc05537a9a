import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ToolStatus(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOOL_STATUS_UNSPECIFIED: _ClassVar[ToolStatus]
    TOOL_STATUS_OK: _ClassVar[ToolStatus]
    TOOL_STATUS_ERROR: _ClassVar[ToolStatus]
    TOOL_STATUS_TIMEOUT: _ClassVar[ToolStatus]
    TOOL_STATUS_PARTIAL: _ClassVar[ToolStatus]
    TOOL_STATUS_REJECTED: _ClassVar[ToolStatus]
    TOOL_STATUS_RATE_LIMITED: _ClassVar[ToolStatus]
    TOOL_STATUS_CIRCUIT_OPEN: _ClassVar[ToolStatus]
    TOOL_STATUS_CANCELLED: _ClassVar[ToolStatus]
    TOOL_STATUS_OUTCOME_UNKNOWN: _ClassVar[ToolStatus]
    TOOL_STATUS_DENIED: _ClassVar[ToolStatus]

class InputWhen(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INPUT_WHEN_UNSPECIFIED: _ClassVar[InputWhen]
    ASAP: _ClassVar[InputWhen]
    AFTER_TURN: _ClassVar[InputWhen]
TOOL_STATUS_UNSPECIFIED: ToolStatus
TOOL_STATUS_OK: ToolStatus
TOOL_STATUS_ERROR: ToolStatus
TOOL_STATUS_TIMEOUT: ToolStatus
TOOL_STATUS_PARTIAL: ToolStatus
TOOL_STATUS_REJECTED: ToolStatus
TOOL_STATUS_RATE_LIMITED: ToolStatus
TOOL_STATUS_CIRCUIT_OPEN: ToolStatus
TOOL_STATUS_CANCELLED: ToolStatus
TOOL_STATUS_OUTCOME_UNKNOWN: ToolStatus
TOOL_STATUS_DENIED: ToolStatus
INPUT_WHEN_UNSPECIFIED: InputWhen
ASAP: InputWhen
AFTER_TURN: InputWhen

class RunAgentRequest(_message.Message):
    __slots__ = ("message", "system", "model", "max_turns", "tools", "metadata", "max_tokens", "idempotency_key", "on_disconnect", "max_tool_calls", "max_output_tokens", "durability")
    class OnDisconnect(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        ON_DISCONNECT_UNSPECIFIED: _ClassVar[RunAgentRequest.OnDisconnect]
        CANCEL: _ClassVar[RunAgentRequest.OnDisconnect]
        CONTINUE: _ClassVar[RunAgentRequest.OnDisconnect]
    ON_DISCONNECT_UNSPECIFIED: RunAgentRequest.OnDisconnect
    CANCEL: RunAgentRequest.OnDisconnect
    CONTINUE: RunAgentRequest.OnDisconnect
    class Durability(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DURABILITY_UNSPECIFIED: _ClassVar[RunAgentRequest.Durability]
        DURABLE: _ClassVar[RunAgentRequest.Durability]
        NOT_DURABLE: _ClassVar[RunAgentRequest.Durability]
    DURABILITY_UNSPECIFIED: RunAgentRequest.Durability
    DURABLE: RunAgentRequest.Durability
    NOT_DURABLE: RunAgentRequest.Durability
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SYSTEM_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    MAX_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURABILITY_FIELD_NUMBER: _ClassVar[int]
    message: str
    system: str
    model: str
    max_turns: int
    tools: _containers.RepeatedScalarFieldContainer[str]
    metadata: _containers.ScalarMap[str, str]
    max_tokens: int
    idempotency_key: str
    on_disconnect: RunAgentRequest.OnDisconnect
    max_tool_calls: int
    max_output_tokens: int
    durability: RunAgentRequest.Durability
    def __init__(self, message: _Optional[str] = ..., system: _Optional[str] = ..., model: _Optional[str] = ..., max_turns: _Optional[int] = ..., tools: _Optional[_Iterable[str]] = ..., metadata: _Optional[_Mapping[str, str]] = ..., max_tokens: _Optional[int] = ..., idempotency_key: _Optional[str] = ..., on_disconnect: _Optional[_Union[RunAgentRequest.OnDisconnect, str]] = ..., max_tool_calls: _Optional[int] = ..., max_output_tokens: _Optional[int] = ..., durability: _Optional[_Union[RunAgentRequest.Durability, str]] = ...) -> None: ...

class AgentEvent(_message.Message):
    __slots__ = ("run_id", "seq", "time", "first_seq", "run_started", "thinking", "text_delta", "tool_call", "tool_call_delta", "tool_call_ready", "tool_result_chunk", "tool_retry", "tool_fallback", "tool_result", "execution_failed", "usage", "final_response", "error", "model_retry", "tool_data_part", "run_recovered", "approval_required", "approval_decided", "input_received")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    FIRST_SEQ_FIELD_NUMBER: _ClassVar[int]
    RUN_STARTED_FIELD_NUMBER: _ClassVar[int]
    THINKING_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_DELTA_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALL_READY_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_CHUNK_FIELD_NUMBER: _ClassVar[int]
    TOOL_RETRY_FIELD_NUMBER: _ClassVar[int]
    TOOL_FALLBACK_FIELD_NUMBER: _ClassVar[int]
    TOOL_RESULT_FIELD_NUMBER: _ClassVar[int]
    EXECUTION_FAILED_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    MODEL_RETRY_FIELD_NUMBER: _ClassVar[int]
    TOOL_DATA_PART_FIELD_NUMBER: _ClassVar[int]
    RUN_RECOVERED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_DECIDED_FIELD_NUMBER: _ClassVar[int]
    INPUT_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    seq: int
    time: _timestamp_pb2.Timestamp
    first_seq: int
    run_started: RunStarted
    thinking: Thinking
    text_delta: TextDelta
    tool_call: ToolCall
    tool_call_delta: ToolCallDelta
    tool_call_ready: ToolCallReady
    tool_result_chunk: ToolResultChunk
    tool_retry: ToolRetry
    tool_fallback: ToolFallback
    tool_result: ToolResult
    execution_failed: ExecutionFailed
    usage: Usage
    final_response: FinalResponse
    error: Error
    model_retry: ModelRetry
    tool_data_part: ToolDataPart
    run_recovered: RunRecovered
    approval_required: ApprovalRequired
    approval_decided: ApprovalDecided
    input_received: InputReceived
    def __init__(self, run_id: _Optional[str] = ..., seq: _Optional[int] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., first_seq: _Optional[int] = ..., run_started: _Optional[_Union[RunStarted, _Mapping]] = ..., thinking: _Optional[_Union[Thinking, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., tool_call: _Optional[_Union[ToolCall, _Mapping]] = ..., tool_call_delta: _Optional[_Union[ToolCallDelta, _Mapping]] = ..., tool_call_ready: _Optional[_Union[ToolCallReady, _Mapping]] = ..., tool_result_chunk: _Optional[_Union[ToolResultChunk, _Mapping]] = ..., tool_retry: _Optional[_Union[ToolRetry, _Mapping]] = ..., tool_fallback: _Optional[_Union[ToolFallback, _Mapping]] = ..., tool_result: _Optional[_Union[ToolResult, _Mapping]] = ..., execution_failed: _Optional[_Union[ExecutionFailed, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., final_response: _Optional[_Union[FinalResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., model_retry: _Optional[_Union[ModelRetry, _Mapping]] = ..., tool_data_part: _Optional[_Union[ToolDataPart, _Mapping]] = ..., run_recovered: _Optional[_Union[RunRecovered, _Mapping]] = ..., approval_required: _Optional[_Union[ApprovalRequired, _Mapping]] = ..., approval_decided: _Optional[_Union[ApprovalDecided, _Mapping]] = ..., input_received: _Optional[_Union[InputReceived, _Mapping]] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("model", "tools", "max_turns")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    MAX_TURNS_FIELD_NUMBER: _ClassVar[int]
    model: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    max_turns: int
    def __init__(self, model: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ..., max_turns: _Optional[int] = ...) -> None: ...

class Thinking(_message.Message):
    __slots__ = ("turn", "text")
    TURN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    turn: int
    text: str
    def __init__(self, turn: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("turn", "text")
    TURN_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    turn: int
    text: str
    def __init__(self, turn: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class ToolCall(_message.Message):
    __slots__ = ("turn", "call_id", "name")
    TURN_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    turn: int
    call_id: str
    name: str
    def __init__(self, turn: _Optional[int] = ..., call_id: _Optional[str] = ..., name: _Optional[str] = ...) -> None: ...

class ToolCallDelta(_message.Message):
    __slots__ = ("call_id", "partial_json")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_JSON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    partial_json: str
    def __init__(self, call_id: _Optional[str] = ..., partial_json: _Optional[str] = ...) -> None: ...

class ToolCallReady(_message.Message):
    __slots__ = ("call_id", "name", "input")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    input: _struct_pb2.Struct
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ToolResultChunk(_message.Message):
    __slots__ = ("call_id", "index", "total", "data", "data_parts")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    DATA_PARTS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    index: int
    total: int
    data: _struct_pb2.Value
    data_parts: int
    def __init__(self, call_id: _Optional[str] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., data: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., data_parts: _Optional[int] = ...) -> None: ...

class ToolDataPart(_message.Message):
    __slots__ = ("call_id", "index", "total", "json")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    index: int
    total: int
    json: str
    def __init__(self, call_id: _Optional[str] = ..., index: _Optional[int] = ..., total: _Optional[int] = ..., json: _Optional[str] = ...) -> None: ...

class ToolRetry(_message.Message):
    __slots__ = ("call_id", "attempt", "max_attempts", "wait", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    attempt: int
    max_attempts: int
    wait: _duration_pb2.Duration
    error: str
    def __init__(self, call_id: _Optional[str] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class ToolFallback(_message.Message):
    __slots__ = ("call_id", "primary", "fallback", "reason")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    PRIMARY_FIELD_NUMBER: _ClassVar[int]
    FALLBACK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    primary: str
    fallback: str
    reason: str
    def __init__(self, call_id: _Optional[str] = ..., primary: _Optional[str] = ..., fallback: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ToolResult(_message.Message):
    __slots__ = ("call_id", "name", "status", "duration", "data", "error", "attempts", "cache_hit", "answered_by", "data_parts")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    CACHE_HIT_FIELD_NUMBER: _ClassVar[int]
    ANSWERED_BY_FIELD_NUMBER: _ClassVar[int]
    DATA_PARTS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    status: ToolStatus
    duration: _duration_pb2.Duration
    data: _struct_pb2.Value
    error: str
    attempts: int
    cache_hit: bool
    answered_by: str
    data_parts: int
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., status: _Optional[_Union[ToolStatus, str]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., data: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., error: _Optional[str] = ..., attempts: _Optional[int] = ..., cache_hit: _Optional[bool] = ..., answered_by: _Optional[str] = ..., data_parts: _Optional[int] = ...) -> None: ...

class ExecutionFailed(_message.Message):
    __slots__ = ("execution_id", "call_id", "tool", "message")
    EXECUTION_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    execution_id: str
    call_id: str
    tool: str
    message: str
    def __init__(self, execution_id: _Optional[str] = ..., call_id: _Optional[str] = ..., tool: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class ModelRetry(_message.Message):
    __slots__ = ("turn", "attempt", "max_attempts", "wait", "error")
    TURN_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    turn: int
    attempt: int
    max_attempts: int
    wait: _duration_pb2.Duration
    error: str
    def __init__(self, turn: _Optional[int] = ..., attempt: _Optional[int] = ..., max_attempts: _Optional[int] = ..., wait: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error: _Optional[str] = ...) -> None: ...

class RunRecovered(_message.Message):
    __slots__ = ("step_no", "turn", "seq", "reason")
    STEP_NO_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    step_no: int
    turn: int
    seq: int
    reason: str
    def __init__(self, step_no: _Optional[int] = ..., turn: _Optional[int] = ..., seq: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("turn", "input_tokens", "output_tokens", "total_input_tokens", "total_output_tokens")
    TURN_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    turn: int
    input_tokens: int
    output_tokens: int
    total_input_tokens: int
    total_output_tokens: int
    def __init__(self, turn: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_input_tokens: _Optional[int] = ..., total_output_tokens: _Optional[int] = ...) -> None: ...

class FinalResponse(_message.Message):
    __slots__ = ("text", "stop_reason", "turns", "tool_calls", "input_tokens", "output_tokens", "duration")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    text: str
    stop_reason: str
    turns: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    duration: _duration_pb2.Duration
    def __init__(self, text: _Optional[str] = ..., stop_reason: _Optional[str] = ..., turns: _Optional[int] = ..., tool_calls: _Optional[int] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("code", "message", "retryable")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_FIELD_NUMBER: _ClassVar[int]
    code: str
    message: str
    retryable: bool
    def __init__(self, code: _Optional[str] = ..., message: _Optional[str] = ..., retryable: _Optional[bool] = ...) -> None: ...

class ListToolsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ToolInfo(_message.Message):
    __slots__ = ("name", "description", "input_schema", "streaming")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCHEMA_FIELD_NUMBER: _ClassVar[int]
    STREAMING_FIELD_NUMBER: _ClassVar[int]
    name: str
    description: str
    input_schema: _struct_pb2.Struct
    streaming: bool
    def __init__(self, name: _Optional[str] = ..., description: _Optional[str] = ..., input_schema: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., streaming: _Optional[bool] = ...) -> None: ...

class ListToolsResponse(_message.Message):
    __slots__ = ("tools",)
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedCompositeFieldContainer[ToolInfo]
    def __init__(self, tools: _Optional[_Iterable[_Union[ToolInfo, _Mapping]]] = ...) -> None: ...

class WatchRunRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class CancelRunRequest(_message.Message):
    __slots__ = ("run_id", "mode")
    class Mode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        MODE_UNSPECIFIED: _ClassVar[CancelRunRequest.Mode]
        IMMEDIATE: _ClassVar[CancelRunRequest.Mode]
        AFTER_TURN: _ClassVar[CancelRunRequest.Mode]
    MODE_UNSPECIFIED: CancelRunRequest.Mode
    IMMEDIATE: CancelRunRequest.Mode
    AFTER_TURN: CancelRunRequest.Mode
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    mode: CancelRunRequest.Mode
    def __init__(self, run_id: _Optional[str] = ..., mode: _Optional[_Union[CancelRunRequest.Mode, str]] = ...) -> None: ...

class CancelRunResponse(_message.Message):
    __slots__ = ("run_id", "state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: Run.State
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[Run.State, str]] = ...) -> None: ...

class SubmitRunResponse(_message.Message):
    __slots__ = ("run_id", "state")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: Run.State
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[Run.State, str]] = ...) -> None: ...

class GetRunRequest(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class Run(_message.Message):
    __slots__ = ("run_id", "state", "last_seq", "final_response", "error", "created", "ended", "queue_position")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        STATE_UNSPECIFIED: _ClassVar[Run.State]
        QUEUED: _ClassVar[Run.State]
        RUNNING: _ClassVar[Run.State]
        SUCCEEDED: _ClassVar[Run.State]
        FAILED: _ClassVar[Run.State]
        CANCELLED: _ClassVar[Run.State]
    STATE_UNSPECIFIED: Run.State
    QUEUED: Run.State
    RUNNING: Run.State
    SUCCEEDED: Run.State
    FAILED: Run.State
    CANCELLED: Run.State
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    ENDED_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    state: Run.State
    last_seq: int
    final_response: FinalResponse
    error: Error
    created: _timestamp_pb2.Timestamp
    ended: _timestamp_pb2.Timestamp
    queue_position: int
    def __init__(self, run_id: _Optional[str] = ..., state: _Optional[_Union[Run.State, str]] = ..., last_seq: _Optional[int] = ..., final_response: _Optional[_Union[FinalResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., ended: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., queue_position: _Optional[int] = ...) -> None: ...

class ToolCallRecord(_message.Message):
    __slots__ = ("call_id", "name", "turn", "input", "result")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    turn: int
    input: _struct_pb2.Struct
    result: ToolResult
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., turn: _Optional[int] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., result: _Optional[_Union[ToolResult, _Mapping]] = ...) -> None: ...

class RunResult(_message.Message):
    __slots__ = ("run_id", "final_response", "tool_calls", "last_seq", "data_omitted")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    FINAL_RESPONSE_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQ_FIELD_NUMBER: _ClassVar[int]
    DATA_OMITTED_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    final_response: FinalResponse
    tool_calls: _containers.RepeatedCompositeFieldContainer[ToolCallRecord]
    last_seq: int
    data_omitted: bool
    def __init__(self, run_id: _Optional[str] = ..., final_response: _Optional[_Union[FinalResponse, _Mapping]] = ..., tool_calls: _Optional[_Iterable[_Union[ToolCallRecord, _Mapping]]] = ..., last_seq: _Optional[int] = ..., data_omitted: _Optional[bool] = ...) -> None: ...

class ApprovalRequired(_message.Message):
    __slots__ = ("call_id", "name", "input", "reason", "deadline", "approvers")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    APPROVERS_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    name: str
    input: _struct_pb2.Struct
    reason: str
    deadline: _timestamp_pb2.Timestamp
    approvers: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, call_id: _Optional[str] = ..., name: _Optional[str] = ..., input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., reason: _Optional[str] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., approvers: _Optional[_Iterable[str]] = ...) -> None: ...

class ApprovalDecided(_message.Message):
    __slots__ = ("call_id", "approved", "decided_by", "reason", "edited_input")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVED_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EDITED_INPUT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    approved: bool
    decided_by: str
    reason: str
    edited_input: _struct_pb2.Struct
    def __init__(self, call_id: _Optional[str] = ..., approved: _Optional[bool] = ..., decided_by: _Optional[str] = ..., reason: _Optional[str] = ..., edited_input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class InputReceived(_message.Message):
    __slots__ = ("text", "when", "sent_by")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    SENT_BY_FIELD_NUMBER: _ClassVar[int]
    text: str
    when: InputWhen
    sent_by: str
    def __init__(self, text: _Optional[str] = ..., when: _Optional[_Union[InputWhen, str]] = ..., sent_by: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("call_id", "reason", "edited_input")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EDITED_INPUT_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    reason: str
    edited_input: _struct_pb2.Struct
    def __init__(self, call_id: _Optional[str] = ..., reason: _Optional[str] = ..., edited_input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class AttachRequest(_message.Message):
    __slots__ = ("run_id", "after_seq")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQ_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    after_seq: int
    def __init__(self, run_id: _Optional[str] = ..., after_seq: _Optional[int] = ...) -> None: ...

class ClientMessage(_message.Message):
    __slots__ = ("start", "attach", "approve", "deny", "send_input", "cancel_tool", "cancel_run")
    START_FIELD_NUMBER: _ClassVar[int]
    ATTACH_FIELD_NUMBER: _ClassVar[int]
    APPROVE_FIELD_NUMBER: _ClassVar[int]
    DENY_FIELD_NUMBER: _ClassVar[int]
    SEND_INPUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_TOOL_FIELD_NUMBER: _ClassVar[int]
    CANCEL_RUN_FIELD_NUMBER: _ClassVar[int]
    start: RunAgentRequest
    attach: AttachRequest
    approve: Decision
    deny: Decision
    send_input: SendInputRequest
    cancel_tool: CancelToolCallRequest
    cancel_run: CancelRunRequest
    def __init__(self, start: _Optional[_Union[RunAgentRequest, _Mapping]] = ..., attach: _Optional[_Union[AttachRequest, _Mapping]] = ..., approve: _Optional[_Union[Decision, _Mapping]] = ..., deny: _Optional[_Union[Decision, _Mapping]] = ..., send_input: _Optional[_Union[SendInputRequest, _Mapping]] = ..., cancel_tool: _Optional[_Union[CancelToolCallRequest, _Mapping]] = ..., cancel_run: _Optional[_Union[CancelRunRequest, _Mapping]] = ...) -> None: ...

class ResolveApprovalRequest(_message.Message):
    __slots__ = ("run_id", "call_id", "decision", "reason", "edited_input")
    class Verdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        VERDICT_UNSPECIFIED: _ClassVar[ResolveApprovalRequest.Verdict]
        APPROVE: _ClassVar[ResolveApprovalRequest.Verdict]
        DENY: _ClassVar[ResolveApprovalRequest.Verdict]
    VERDICT_UNSPECIFIED: ResolveApprovalRequest.Verdict
    APPROVE: ResolveApprovalRequest.Verdict
    DENY: ResolveApprovalRequest.Verdict
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    EDITED_INPUT_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    call_id: str
    decision: ResolveApprovalRequest.Verdict
    reason: str
    edited_input: _struct_pb2.Struct
    def __init__(self, run_id: _Optional[str] = ..., call_id: _Optional[str] = ..., decision: _Optional[_Union[ResolveApprovalRequest.Verdict, str]] = ..., reason: _Optional[str] = ..., edited_input: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class ResolveApprovalResponse(_message.Message):
    __slots__ = ("run_id", "call_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    call_id: str
    def __init__(self, run_id: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class SendInputRequest(_message.Message):
    __slots__ = ("run_id", "text", "when")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    WHEN_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    text: str
    when: InputWhen
    def __init__(self, run_id: _Optional[str] = ..., text: _Optional[str] = ..., when: _Optional[_Union[InputWhen, str]] = ...) -> None: ...

class SendInputResponse(_message.Message):
    __slots__ = ("run_id",)
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    def __init__(self, run_id: _Optional[str] = ...) -> None: ...

class CancelToolCallRequest(_message.Message):
    __slots__ = ("run_id", "call_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    call_id: str
    def __init__(self, run_id: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class CancelToolCallResponse(_message.Message):
    __slots__ = ("run_id", "call_id")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    call_id: str
    def __init__(self, run_id: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...
