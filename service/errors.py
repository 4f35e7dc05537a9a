"""Failures that end a run, kept apart from tool failures (those are data the model reads, see `tools.base`).

    AgentError
    ├── ModelError            raised by a Model adapter; `retryable` says whether a turn may be tried again
    └── RunError              ends a run: an `error` event, then the gRPC status named by `code`
        ├── MaxTurnsExceeded      RESOURCE_EXHAUSTED
        ├── BudgetExceeded        RESOURCE_EXHAUSTED: a per-run tool-call or output-token limit
        ├── DeadlineExceeded      DEADLINE_EXCEEDED: the run's deadline (the caller's gRPC deadline) passed
        ├── RunCancelled          CANCELLED: CancelRun, or the caller left a run that does not outlive it
        ├── ModelUnavailable      UNAVAILABLE (retryable): the model stayed down or failed mid-turn
        ├── ModelRequestFailed    FAILED_PRECONDITION / INVALID_ARGUMENT: the model refused the request
        └── RunInterrupted        UNAVAILABLE (retryable): the server is shutting down

`code` is a gRPC status code name so that this module needs no gRPC import; `service/api.py` maps it once.
"""

from __future__ import annotations


class AgentError(Exception):
    """Base of the service's own exceptions."""


class ModelError(AgentError):
    """A model call failed. `status` is the upstream HTTP status when there was one; `retry_after_s` how long the
    upstream asked to wait before another try, when it said."""

    def __init__(
        self, message: str, *, retryable: bool, status: int | None = None, retry_after_s: float | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s


class RunError(AgentError):
    """Ends a run with an `error` event and the gRPC status `code`."""

    code = "INTERNAL"
    retryable = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class MaxTurnsExceeded(RunError):
    code = "RESOURCE_EXHAUSTED"


class ModelUnavailable(RunError):
    code = "UNAVAILABLE"
    retryable = True


class ModelRequestFailed(RunError):
    code = "FAILED_PRECONDITION"

    def __init__(self, message: str, *, code: str = "FAILED_PRECONDITION") -> None:
        super().__init__(message)
        self.code = code


class RunInterrupted(RunError):
    code = "UNAVAILABLE"
    retryable = True


class RunCancelled(RunError):
    """Stopped on request (CancelRun, or the caller went away)."""

    code = "CANCELLED"


class DeadlineExceeded(RunError):
    code = "DEADLINE_EXCEEDED"


class BudgetExceeded(RunError):
    """A per-run limit (tool calls, output tokens) was reached."""

    code = "RESOURCE_EXHAUSTED"
