"""The service's exceptions, one tree. Each class carries the gRPC status its failure ends a call with (`code`, a status
code name, so that this module needs no gRPC import) and a stable `reason` (UPPER_SNAKE, ready for
`google.rpc.ErrorInfo`); `service/rpc/status.py` maps them to the call's status, once. Tool failures are not here:
they are data the model reads (`tools.base.ToolError`).

    AgentError
    ├── ModelError            raised by a Model adapter; `retryable` says whether a turn may be tried again; never
    │                         reaches a caller as such (`model_failure` turns it into a RunError)
    ├── RunError              ends a run: an `error` event, then the call's status
    │   ├── MaxTurnsExceeded      RESOURCE_EXHAUSTED
    │   ├── BudgetExceeded        RESOURCE_EXHAUSTED: a per-run tool-call or output-token limit
    │   ├── DeadlineExceeded      DEADLINE_EXCEEDED: the run's deadline (the caller's gRPC deadline) passed
    │   ├── RunCancelled          CANCELLED: CancelRun, or the caller left a run that does not outlive it
    │   ├── ModelUnavailable      UNAVAILABLE (retryable): the model stayed down, went silent, sent a malformed
    │   │                         stream, or failed mid-turn
    │   ├── ModelRequestFailed    INVALID_ARGUMENT: the model API rejected the request; FAILED_PRECONDITION: it
    │   │                         refused the server's own credentials or account (the caller is not at fault)
    │   ├── RunInterrupted        UNAVAILABLE (retryable): the server is shutting down
    │   └── RunHandedOver         UNAVAILABLE (retryable): a durable run goes on in another process (drain, takeover);
    │                             this stream ends, WatchRun from `after_seq` follows it there
    └── RequestError          refuses a call as sent; no run starts (or none is touched)
        ├── InvalidRequest        INVALID_ARGUMENT: the message says what to change
        ├── Unauthenticated       UNAUTHENTICATED: no valid credentials where they are required
        ├── PermissionDenied      PERMISSION_DENIED: a tool outside the caller's rights, another's runs
        ├── CallerLimited         RESOURCE_EXHAUSTED: the caller's concurrent runs or runs per minute
        ├── QueueFull             RESOURCE_EXHAUSTED: the background queue
        ├── RequestTooLarge       RESOURCE_EXHAUSTED: an HTTP body over the receive limit (HTTP 413)
        ├── SubscriberTooSlow     RESOURCE_EXHAUSTED: a stream fell too far behind its run and was dropped
        ├── NotFound              NOT_FOUND: no such run (or another caller's)
        ├── IdempotencyConflict   ALREADY_EXISTS: the key was used with a different request
        ├── ToolUnavailable       FAILED_PRECONDITION: a tool that cannot work on this server
        ├── DurabilityUnavailable FAILED_PRECONDITION: a durable run asked of a server that cannot checkpoint
        ├── RunAlreadyEnded       FAILED_PRECONDITION: nothing left to cancel
        ├── DeadlineTooShort      DEADLINE_EXCEEDED: the call's deadline leaves no time for a run and its error event
        ├── NotNow                FAILED_PRECONDITION: an interaction that makes no sense now (no such call waits
        │                         for approval, it was decided already, it is not running)
        ├── TooManyInputs         RESOURCE_EXHAUSTED: a run's steering inputs not yet read are at their bound
        ├── Relayed               the refusal (its status) of the replica that drives the run (deliver.py)
        ├── AfterSeqOutOfRange    OUT_OF_RANGE: a seq the run has not logged
        ├── ServerDraining        UNAVAILABLE: the server is shutting down; retry on another replica
        ├── RecordsUnavailable    UNAVAILABLE (retry later): the records database (records.url) does not answer
        └── StateUnavailable      UNAVAILABLE: the shared run state (Redis) cannot be reached; retry shortly
"""

from __future__ import annotations

from typing import Literal

# What went wrong with a model call, as far as the run's status goes (see `model_failure`):
#   unavailable  overloaded, rate limited, 5xx, connection lost, timed out, silent: the model's side, for a while
#   credentials  the API refused the server's own key, permissions or account (401, 403, billing)
#   rejected     the API refused this request as sent (400, 404 unknown model, 413 too large)
#   malformed    the stream broke the Messages protocol (a proxy's error page, cut or garbled events)
ModelFailure = Literal["unavailable", "credentials", "rejected", "malformed"]


DOMAIN = "agent.v1"
"""The `domain` of the ErrorInfo every error carries (gRPC trailers, HTTP JSON body): the service whose reasons these
are."""


class AgentError(Exception):
    """Base of the service's own exceptions: `message` for the caller, `code` and `reason` (see the module);
    `retryable`: whether the same request may succeed later (the ErrorInfo's metadata says so)."""

    code = "INTERNAL"
    reason = "INTERNAL"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ModelError(AgentError):
    """A model call failed. `status` is the upstream HTTP status when there was one; `retry_after_s` how long the
    upstream asked to wait before another try, when it said; `kind` what failed (None: judged from `status` and
    `retryable`)."""

    code = "UNAVAILABLE"
    reason = "MODEL_ERROR"

    def __init__(
        self,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
        kind: ModelFailure | None = None,
    ) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.kind = kind


class RunError(AgentError):
    """Ends a run with an `error` event and the gRPC status `code`."""

    reason = "RUN_FAILED"
    retryable = False


class MaxTurnsExceeded(RunError):
    code = "RESOURCE_EXHAUSTED"
    reason = "MAX_TURNS_EXCEEDED"


class ModelUnavailable(RunError):
    code = "UNAVAILABLE"
    reason = "MODEL_UNAVAILABLE"
    retryable = True


class ModelRequestFailed(RunError):
    code = "FAILED_PRECONDITION"
    reason = "MODEL_REQUEST_FAILED"

    def __init__(
        self, message: str, *, code: str = "FAILED_PRECONDITION", reason: str = "MODEL_REQUEST_FAILED"
    ) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class RunInterrupted(RunError):
    code = "UNAVAILABLE"
    reason = "RUN_INTERRUPTED"
    retryable = True


class RunHandedOver(RunError):
    """This process no longer drives a durable run: it released it at a drain, or another process claimed it (this
    one was thought dead). The run is not over: its new owner continues it, and a WatchRun from `last_seq` (on any
    replica of a fleet; on this node after its restart) follows it there."""

    code = "UNAVAILABLE"
    reason = "RUN_HANDED_OVER"
    retryable = True

    def __init__(self, run_id: str, last_seq: int, why: str, *, one_node: bool = False) -> None:
        """`one_node`: no peer can take the run (memory:// state); its checkpoints and events wait in data_dir for
        the server's next start there, which continues it."""
        goes_on = "it goes on when the server starts again on its data_dir" if one_node else "it goes on elsewhere"
        super().__init__(
            f"run {run_id} {why}; {goes_on}: follow it with WatchRun(run_id={run_id!r}, after_seq={last_seq})"
        )
        self.run_id, self.last_seq, self.why, self.one_node = run_id, last_seq, why, one_node

    def at(self, seq: int) -> RunHandedOver:
        """The same, for a stream that was sent seqs up to `seq` only."""
        return RunHandedOver(self.run_id, seq, self.why, one_node=self.one_node)


class RunCancelled(RunError):
    """Stopped on request (CancelRun, or the caller went away)."""

    code = "CANCELLED"
    reason = "RUN_CANCELLED"


class DeadlineExceeded(RunError):
    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_EXCEEDED"


class BudgetExceeded(RunError):
    """A per-run limit (tool calls, output tokens) was reached."""

    code = "RESOURCE_EXHAUSTED"
    reason = "BUDGET_EXCEEDED"


class RequestError(AgentError):
    """Refuses a call as sent: the call ends with status `code` and the message, and no run starts."""

    code = "INVALID_ARGUMENT"
    reason = "REQUEST_REFUSED"


class DeadlineTooShort(RequestError):
    """A call whose deadline is nearer than the margin a run keeps before it (service/deadline.py): no run starts.
    An outside finding: such a run sent `run_started` and then its `error` event after the caller's deadline had
    cut the stream (deadlines of 1-10 ms)."""

    code = "DEADLINE_EXCEEDED"
    reason = "DEADLINE_TOO_SHORT"


class InvalidRequest(RequestError):
    """The request cannot run as sent; the message says what to change."""

    code = "INVALID_ARGUMENT"
    reason = "INVALID_REQUEST"


class Unauthenticated(RequestError):
    code = "UNAUTHENTICATED"
    reason = "UNAUTHENTICATED"


class PermissionDenied(RequestError):
    """The caller may not do this: a tool outside its rights (the default reason), another caller's runs, a decision
    two-party control keeps for someone else."""

    code = "PERMISSION_DENIED"
    reason = "TOOL_NOT_PERMITTED"

    def __init__(self, message: str, *, reason: str = "TOOL_NOT_PERMITTED") -> None:
        super().__init__(message)
        self.reason = reason


class CallerLimited(RequestError):
    """The caller is at one of its limits (concurrent runs, runs per minute): retryable, its message says when."""

    code = "RESOURCE_EXHAUSTED"
    reason = "CALLER_LIMITED"
    retryable = True


class QueueFull(RequestError):
    """The background queue is full: retryable once runs leave it (an outside finding: its message said "retry later"
    while its ErrorInfo said retryable false)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "QUEUE_FULL"
    retryable = True


class RequestTooLarge(RequestError):
    """A request body over `limits.max_receive_bytes` (the HTTP face; grpc refuses such a message itself, with the
    same code)."""

    code = "RESOURCE_EXHAUSTED"
    reason = "REQUEST_TOO_LARGE"


class SubscriberTooSlow(RequestError):
    code = "RESOURCE_EXHAUSTED"
    reason = "SUBSCRIBER_TOO_SLOW"

    def __init__(self, run_id: str, last_seq: int, lag: int) -> None:
        super().__init__(
            f"this stream fell {lag} events behind run {run_id} and was dropped; nothing is lost: resume with "
            f"WatchRun(run_id={run_id!r}, after_seq={last_seq})"
        )
        self.last_seq = last_seq


class NotFound(RequestError):
    code = "NOT_FOUND"
    reason = "RUN_NOT_FOUND"


class IdempotencyConflict(RequestError):
    code = "ALREADY_EXISTS"
    reason = "IDEMPOTENCY_CONFLICT"


class DurabilityUnavailable(RequestError):
    """The request asks for a durable run and this server cannot checkpoint runs (yet: issue 18)."""

    code = "FAILED_PRECONDITION"
    reason = "DURABILITY_UNAVAILABLE"


class ToolUnavailable(RequestError):
    """A tool the request names cannot work on this server (`Tool.unavailable` says why)."""

    code = "FAILED_PRECONDITION"
    reason = "TOOL_UNAVAILABLE"


class RunAlreadyEnded(RequestError):
    code = "FAILED_PRECONDITION"
    reason = "RUN_ALREADY_ENDED"


class NotNow(RequestError):
    """An approval, input or tool cancel for a run that has nothing it applies to now (`service/interact.py`)."""

    code = "FAILED_PRECONDITION"
    reason = "NOT_NOW"


class TooManyInputs(RequestError):
    code = "RESOURCE_EXHAUSTED"
    reason = "TOO_MANY_INPUTS"


class Relayed(RequestError):
    """Another replica refused a message for a run it drives: its status and message, passed on."""

    reason = "RELAYED"  # the instance carries the driving replica's own

    def __init__(self, message: str, *, code: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


class AfterSeqOutOfRange(RequestError):
    code = "OUT_OF_RANGE"
    reason = "AFTER_SEQ_OUT_OF_RANGE"


class ServerDraining(RequestError):
    code = "UNAVAILABLE"
    reason = "SERVER_DRAINING"


class RecordsUnavailable(RequestError):
    code = "UNAVAILABLE"
    reason = "RECORDS_UNAVAILABLE"


class StateUnavailable(RequestError):
    """A new run, or a call about a run another replica drives, needs the shared state store, which this replica
    cannot reach now (runs it already drives go on)."""

    code = "UNAVAILABLE"
    reason = "STATE_STORE_UNAVAILABLE"


def failure_of_status(status: int) -> ModelFailure:
    """What an HTTP status of a model API says failed."""
    if status in (401, 402, 403):
        return "credentials"
    if status in (408, 409, 429) or status >= 500:
        return "unavailable"
    return "rejected"


def model_failure(turn: int, exc: ModelError) -> RunError:
    """The run's end for a model failure that is not tried again, saying what happened: the caller is at fault only
    when the API rejected the request as sent (INVALID_ARGUMENT); the model being down, whatever the API says of
    retrying, is UNAVAILABLE; the server's own credentials or account refused is FAILED_PRECONDITION (nothing the
    caller can change, and no retry helps until an operator does)."""
    status = exc.status
    kind = exc.kind or (failure_of_status(status) if status is not None else None)
    if kind == "unavailable":
        return ModelUnavailable(f"the model is unavailable (turn {turn}, not retried as the API asks): {exc.message}")
    if kind == "malformed":
        return ModelUnavailable(f"the model's stream was malformed (turn {turn}): {exc.message}")
    if kind == "credentials":
        return ModelRequestFailed(
            f"the model API refused the server's credentials or account, a problem of the server's set-up, not of "
            f"the request: {exc.message}",
            reason="MODEL_CREDENTIALS_REFUSED",
        )
    if kind == "rejected" and status in (None, 400, 404, 413):
        return ModelRequestFailed(
            f"the model API rejected the request: {exc.message}",
            code="INVALID_ARGUMENT",
            reason="MODEL_REQUEST_REJECTED",
        )
    return ModelRequestFailed(f"the model request failed: {exc.message}")
