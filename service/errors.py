"""Failures that end a run, kept apart from tool failures (those are data the model reads, see `tools.base`).

    AgentError
    ├── ModelError            raised by a Model adapter; `retryable` says whether a turn may be tried again
    └── RunError              ends a run: an `error` event, then the gRPC status named by `code`
        ├── MaxTurnsExceeded      RESOURCE_EXHAUSTED
        ├── BudgetExceeded        RESOURCE_EXHAUSTED: a per-run tool-call or output-token limit
        ├── DeadlineExceeded      DEADLINE_EXCEEDED: the run's deadline (the caller's gRPC deadline) passed
        ├── RunCancelled          CANCELLED: CancelRun, or the caller left a run that does not outlive it
        ├── ModelUnavailable      UNAVAILABLE (retryable): the model stayed down, went silent, sent a malformed
        │                         stream, or failed mid-turn
        ├── ModelRequestFailed    INVALID_ARGUMENT: the model API rejected the request; FAILED_PRECONDITION: it
        │                         refused the server's own credentials or account (the caller is not at fault)
        └── RunInterrupted        UNAVAILABLE (retryable): the server is shutting down

`code` is a gRPC status code name so that this module needs no gRPC import; `service/rpc/` maps it once.
"""

from __future__ import annotations

from typing import Literal

# What went wrong with a model call, as far as the run's status goes (see `model_failure`):
#   unavailable  overloaded, rate limited, 5xx, connection lost, timed out, silent: the model's side, for a while
#   credentials  the API refused the server's own key, permissions or account (401, 403, billing)
#   rejected     the API refused this request as sent (400, 404 unknown model, 413 too large)
#   malformed    the stream broke the Messages protocol (a proxy's error page, cut or garbled events)
ModelFailure = Literal["unavailable", "credentials", "rejected", "malformed"]


class AgentError(Exception):
    """Base of the service's own exceptions."""


class ModelError(AgentError):
    """A model call failed. `status` is the upstream HTTP status when there was one; `retry_after_s` how long the
    upstream asked to wait before another try, when it said; `kind` what failed (None: judged from `status` and
    `retryable`)."""

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
        self.message = message
        self.retryable = retryable
        self.status = status
        self.retry_after_s = retry_after_s
        self.kind = kind


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
            f"the request: {exc.message}"
        )
    if kind == "rejected" and status in (None, 400, 404, 413):
        return ModelRequestFailed(f"the model API rejected the request: {exc.message}", code="INVALID_ARGUMENT")
    return ModelRequestFailed(f"the model request failed: {exc.message}")
