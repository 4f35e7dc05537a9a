"""The one map from the service's errors to an HTTP response: the status that matches the error's gRPC code (as
Google's HTTP/JSON APIs map them) and a JSON body `{code, message, details}`."""

from __future__ import annotations

import json

from service.errors import DOMAIN, AgentError

HTTP_STATUS = {
    "OK": 200,
    "CANCELLED": 499,  # "client closed request", as nginx and Google's APIs use it
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "UNAUTHENTICATED": 401,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
}
MAX_MESSAGE = 2000  # characters, as the gRPC face's status details


# Where one gRPC code covers HTTP statuses that differ: a body too large is RESOURCE_EXHAUSTED, as grpc says of an
# oversized message, but HTTP has its own status for it (a client backing off as from a 429 would send it again)
BY_REASON = {"REQUEST_TOO_LARGE": 413}


def http_status(code: str) -> int:
    return HTTP_STATUS.get(code, 500)


def error_body(code: str, message: str, reason: str, *, retryable: bool = False) -> bytes:
    """`details` carries a `google.rpc.ErrorInfo` as the gRPC face's trailers do: the error's stable reason, the
    domain and whether a retry may succeed (an outside finding: the HTTP face gave the reason only)."""
    if len(message) > MAX_MESSAGE:
        message = message[: MAX_MESSAGE - 1] + "…"
    info = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": DOMAIN,
        "metadata": {"retryable": "true" if retryable else "false"},
    }
    return json.dumps({"code": code, "message": message, "details": [info]}).encode()


def error_of(exc: AgentError) -> tuple[int, bytes]:
    status = BY_REASON.get(exc.reason) or http_status(exc.code)
    return status, error_body(exc.code, exc.message, exc.reason, retryable=exc.retryable)
