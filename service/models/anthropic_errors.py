"""How the Claude adapter's failures become `ModelError`: SDK, transport and stream-reading errors, the API's error
types and HTTP statuses, and its retry hints. Kept apart from `anthropic.py`, which reads the stream."""

from __future__ import annotations

import email.utils
import time

import anthropic
import httpx2

from service.errors import ModelError, ModelFailure, failure_of_status

# Error types an `error` event can carry after HTTP 200 that no other try will change: the request's own fault.
# Any other (overloaded, api_error, rate limit, timeout, a type not known yet, or data that is not the API's JSON,
# such as a proxy's "upstream connect error") is the upstream's trouble, worth another try.
_FINAL_STREAM_ERRORS = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
        "billing_error",
    }
)

# What each error type says about the failure, for the run's status (see `service.errors.ModelFailure`); a type not
# listed is taken for the upstream's trouble.
_KINDS: dict[str, ModelFailure] = {
    "invalid_request_error": "rejected",
    "not_found_error": "rejected",
    "request_too_large": "rejected",
    "authentication_error": "credentials",
    "permission_error": "credentials",
    "billing_error": "credentials",
}

_LABELS = {
    "overloaded_error": "overloaded",
    "rate_limit_error": "rate limited",
    "api_error": "server error",
    "timeout_error": "timed out",
    "invalid_request_error": "invalid request",
    "authentication_error": "authentication failed",
    "permission_error": "permission denied",
    "not_found_error": "not found",
    "request_too_large": "request too large",
    "billing_error": "billing error",
}


def malformed(detail: str) -> ModelError:
    # Worth another try, as a 502 from a gateway is: a proxy's error page, a cut or garbled stream.
    return ModelError(f"anthropic: malformed stream: {detail}", retryable=True, kind="malformed")


def model_error(err: Exception) -> ModelError:
    """The one place SDK, transport and stream-reading failures become `ModelError`."""
    if isinstance(err, anthropic.APIStatusError):
        return _status_error(err)
    # TimeoutError: a socket or SSL timeout that reached us unwrapped; as worth another try as the SDK's own.
    if isinstance(err, anthropic.APITimeoutError | httpx2.TimeoutException | TimeoutError):
        return ModelError("anthropic: request timed out", retryable=True, kind="unavailable")
    if isinstance(err, anthropic.APIConnectionError):
        cause = err.__cause__ or err
        return ModelError(f"anthropic: connection failed: {cause}", retryable=True, kind="unavailable")
    if isinstance(err, httpx2.TransportError):
        return ModelError(f"anthropic: connection lost mid-stream: {err!r}", retryable=True, kind="unavailable")
    # Nothing else reaches here but from reading the stream (see `stream_turn`): the upstream's data is garbled.
    return malformed(f"{type(err).__name__}: {err}"[:500])


def _status_error(err: anthropic.APIStatusError) -> ModelError:
    error_type = err.type or ""
    label = _LABELS.get(error_type, error_type or "error")
    detail = err.api_message or err.message
    request_id = f" [request-id {err.request_id}]" if err.request_id else ""
    if err.status_code == 200:
        # An `error` event after the stream began: no HTTP status to speak of, the error type decides.
        return ModelError(
            f"anthropic: {label} mid-stream: {detail}{request_id}",
            retryable=error_type not in _FINAL_STREAM_ERRORS,
            kind=_KINDS.get(error_type, "unavailable"),
        )
    status = err.status_code
    headers = err.response.headers
    # As the SDK's own retries decide (they are off here: the loop retries whole turns): the API's word first
    # (`x-should-retry`), else timeouts, lock conflicts, rate limits and server errors.
    should_retry = headers.get("x-should-retry", "").lower()
    retryable = (
        should_retry == "true" if should_retry in ("true", "false") else status in (408, 409, 429) or status >= 500
    )
    return ModelError(
        f"anthropic: {label} (HTTP {status}): {detail}{request_id}",
        retryable=retryable,
        status=status,
        retry_after_s=_retry_after(headers),
        kind=failure_of_status(status),
    )


def _retry_after(headers: httpx2.Headers) -> float | None:
    """How long the API asks us to wait (`retry-after-ms`, else `retry-after` in seconds or as a date), if it does:
    a 429's wait is how long the rate limit lasts, and another try before that fails again."""
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        try:
            seconds = float(headers.get(name, "")) * scale
        except ValueError:
            continue
        return seconds if seconds > 0 else None
    when = email.utils.parsedate_tz(headers.get("retry-after", ""))
    if when is None:
        return None
    seconds = email.utils.mktime_tz(when) - time.time()
    return seconds if seconds > 0 else None
