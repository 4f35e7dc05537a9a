"""Domain events of a run: one small frozen dataclass per kind, and their union. The loop yields these;
`service/rpc/convert.py` turns them into `AgentEvent` protobufs, numbering them per run. Each class names its kind
(`kind`): the `AgentEvent` field it becomes on the wire, and the label it is counted under."""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from service.slots import quick_init


class ToolStatus(enum.Enum):
    OK = "ok"
    ERROR = "error"
    TIMEOUT = "timeout"
    PARTIAL = "partial"
    REJECTED = "rejected"
    RATE_LIMITED = "rate_limited"
    CIRCUIT_OPEN = "circuit_open"
    CANCELLED = "cancelled"
    # A call not safe to repeat was cut off (its process died) before its result was recorded: whether its side
    # effect happened is not known, and it was not sent again. Only `Executor.resume` reports it (`policy/repeat.py`).
    OUTCOME_UNKNOWN = "outcome_unknown"
    # The call needed approval (`service/approvals.py`) and was denied, or nobody decided in time: it never ran.
    DENIED = "denied"


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class RunStarted:
    kind: ClassVar[str] = "run_started"

    model: str
    tools: tuple[str, ...]
    max_turns: int


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class Thinking:
    kind: ClassVar[str] = "thinking"

    turn: int
    text: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class TextDelta:
    kind: ClassVar[str] = "text_delta"

    turn: int
    text: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCall:
    kind: ClassVar[str] = "tool_call"

    turn: int
    call_id: str
    name: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallDelta:
    kind: ClassVar[str] = "tool_call_delta"

    call_id: str
    partial_json: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallReady:
    kind: ClassVar[str] = "tool_call_ready"

    call_id: str
    name: str
    input: dict[str, Any]


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolResultChunk:
    kind: ClassVar[str] = "tool_result_chunk"

    call_id: str
    index: int
    total: int | None
    data: Any
    data_parts: int = 0  # > 0: `data` came just before in this many ToolDataParts (see service/parts.py)


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolDataPart:
    """A piece of the JSON text of tool data too large for one event; the event it belongs to follows the last."""

    kind: ClassVar[str] = "tool_data_part"
    call_id: str
    index: int
    total: int
    json: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolRetry:
    kind: ClassVar[str] = "tool_retry"

    call_id: str
    attempt: int
    max_attempts: int
    wait_s: float
    error: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ModelRetry:
    """A model turn failed before any of it reached the caller and is tried again after `wait_s`."""

    kind: ClassVar[str] = "model_retry"

    turn: int
    attempt: int
    max_attempts: int
    wait_s: float
    error: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolFallback:
    kind: ClassVar[str] = "tool_fallback"

    call_id: str
    primary: str
    fallback: str
    reason: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ExecutionFailed:
    kind: ClassVar[str] = "execution_failed"

    execution_id: str
    call_id: str
    tool: str
    message: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ToolResult:
    kind: ClassVar[str] = "tool_result"

    call_id: str
    name: str
    status: ToolStatus
    duration_s: float
    data: Any = None
    error: str = ""
    attempts: int = 1
    cache_hit: bool = False
    answered_by: str = ""
    data_parts: int = 0  # > 0: `data` came just before in this many ToolDataParts (see service/parts.py)

    @property
    def ok(self) -> bool:
        return self.status in (ToolStatus.OK, ToolStatus.PARTIAL)


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class Usage:
    kind: ClassVar[str] = "usage"

    turn: int
    input_tokens: int
    output_tokens: int
    total_input_tokens: int
    total_output_tokens: int


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class RunRecovered:
    """The process driving the run stopped; this one goes on from the run's last checkpoint (step `step_no`, taken
    when the log's last seq was `seq`; `turn`: the last model turn recorded). What the log holds after `seq` and
    before this event was cut off: the next model turn is streamed again from its start, and a tool call with no
    recorded result is run again if it is safe to repeat, else ends `outcome_unknown`."""

    kind: ClassVar[str] = "run_recovered"

    step_no: int
    turn: int
    seq: int
    reason: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ApprovalRequired:
    """A call waits for a decision until `deadline` (wall clock, seconds since the epoch); `input` is validated."""

    kind: ClassVar[str] = "approval_required"

    call_id: str
    name: str
    input: dict[str, Any]
    reason: str
    deadline: float
    approvers: tuple[str, ...]


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class ApprovalDecided:
    """`decided_by` is the identity that decided ("timeout" when nobody did); `edited_input` the approved edit."""

    kind: ClassVar[str] = "approval_decided"

    call_id: str
    approved: bool
    decided_by: str
    reason: str
    edited_input: dict[str, Any] | None = None


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class InputReceived:
    """Steering text accepted for the model (`when`: "asap" or "after_turn"); the event's seq names it."""

    kind: ClassVar[str] = "input_received"

    text: str
    when: str
    sent_by: str


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class FinalResponse:
    kind: ClassVar[str] = "final_response"

    text: str
    stop_reason: str
    turns: int
    tool_calls: int
    input_tokens: int
    output_tokens: int
    duration_s: float


@quick_init
@dataclass(frozen=True, kw_only=True, slots=True)
class RunFailed:
    """The `error` event: the run ended with gRPC status `code` (a status code name)."""

    kind: ClassVar[str] = "error"

    code: str
    message: str
    retryable: bool


Event = (
    RunStarted
    | Thinking
    | TextDelta
    | ToolCall
    | ToolCallDelta
    | ToolCallReady
    | ToolResultChunk
    | ToolDataPart
    | ToolRetry
    | ToolFallback
    | ToolResult
    | ExecutionFailed
    | Usage
    | ModelRetry
    | RunRecovered
    | ApprovalRequired
    | ApprovalDecided
    | InputReceived
    | FinalResponse
    | RunFailed
)
