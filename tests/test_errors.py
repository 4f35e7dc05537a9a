"""The exception tree: every error the service raises names the gRPC status it ends a call with and a stable reason,
and the tree drawn at the top of `service/errors.py` shows every class."""

from __future__ import annotations

import re

import grpc

from service import errors


def _tree(cls: type[errors.AgentError]) -> list[type[errors.AgentError]]:
    return [cls, *(c for sub in cls.__subclasses__() for c in _tree(sub))]


def test_every_error_carries_a_status_code_and_a_reason() -> None:
    classes = _tree(errors.AgentError)
    assert errors.InvalidRequest in classes and errors.SubscriberTooSlow in classes
    for cls in classes:
        assert cls.code in grpc.StatusCode.__members__, cls
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", cls.reason), cls
    reasons = [cls.reason for cls in classes]
    assert len(reasons) == len(set(reasons))


def test_the_tree_in_the_docstring_names_every_error() -> None:
    doc = errors.__doc__ or ""
    for cls in _tree(errors.AgentError):
        assert re.search(rf"\b{cls.__name__}\b", doc), f"{cls.__name__} is missing from errors.py's tree"


def test_a_model_request_failure_says_whose_fault_it_is() -> None:
    rejected = errors.model_failure(1, errors.ModelError("bad request", retryable=False, status=400))
    refused = errors.model_failure(1, errors.ModelError("bad key", retryable=False, status=401))
    assert (rejected.code, rejected.reason) == ("INVALID_ARGUMENT", "MODEL_REQUEST_REJECTED")
    assert (refused.code, refused.reason) == ("FAILED_PRECONDITION", "MODEL_CREDENTIALS_REFUSED")
