"""The approval rule language (a JSON pointer and a comparison on the validated input) and who may decide."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from conftest import make_config
from fake_tools import all_tools
from service.approvals import Approvals, holds, resolve_pointer, why_needed
from service.config import ApprovalsConfig, CallerConfig
from service.config.approvals import Condition, ToolApproval
from service.interact import Decision
from service.policy.config import PolicyError
from service.wiring import build_approvals

PAYMENT = {"amount": 1500, "currency": "EUR", "to": [{"host": "pay.example.com"}], "a/b": {"~x": 1}}


@pytest.mark.parametrize(
    ("pointer", "found", "value"),
    [
        ("", True, PAYMENT),
        ("/amount", True, 1500),
        ("/to/0/host", True, "pay.example.com"),
        ("/a~1b/~0x", True, 1),  # RFC 6901 escapes: ~1 is "/", ~0 is "~"
        ("/to/1/host", False, None),
        ("/missing", False, None),
        ("/amount/deeper", False, None),
    ],
)
def test_a_pointer_resolves_as_rfc_6901_says(pointer: str, found: bool, value: Any) -> None:
    assert resolve_pointer(PAYMENT, pointer) == (found, value)


@pytest.mark.parametrize(
    ("pointer", "op", "value", "expected"),
    [
        ("/amount", "gt", 1000, True),
        ("/amount", "le", 1000, False),
        ("/currency", "in", ["EUR", "USD"], True),
        ("/currency", "not_in", ["EUR", "USD"], False),
        ("/to/0/host", "prefix", "pay.", True),
        ("/to/0/host", "matches", r"\.example\.com$", True),
        ("/to/0/host", "not_prefix", "internal.", True),
        ("/missing", "eq", None, False),  # naming nothing: false, whatever the test
        ("/missing", "exists", False, True),
        ("/amount", "exists", None, True),
        ("/currency", "gt", 5, True),  # cannot compare a string with a number: ask, the safe side
    ],
)
def test_conditions(pointer: str, op: str, value: Any, expected: bool) -> None:
    assert holds(Condition(pointer=pointer, op=op, value=value), PAYMENT) is expected  # type: ignore[arg-type]


def test_any_asks_when_one_holds_and_all_when_every_one_does() -> None:
    big = {"pointer": "/amount", "op": "gt", "value": 1000}
    euro = {"pointer": "/currency", "op": "eq", "value": "USD"}
    assert why_needed(ToolApproval.model_validate({"approval": "when", "when": {"any": [euro, big]}}), PAYMENT)
    assert not why_needed(ToolApproval.model_validate({"approval": "when", "when": {"all": [euro, big]}}), PAYMENT)
    assert why_needed(ToolApproval(approval="always"), {}) and not why_needed(ToolApproval(approval="never"), {})
    assert not why_needed(None, PAYMENT)


def test_configs_that_cannot_work_are_refused() -> None:
    with pytest.raises(ValidationError, match="needs approvers"):
        ApprovalsConfig(two_party=True)
    with pytest.raises(ValidationError, match="with \\(and only with\\)"):
        ToolApproval(approval="when")
    with pytest.raises(ValidationError, match="pattern"):
        Condition(pointer="amount", op="gt", value=1)  # a pointer starts with "/"


def test_who_may_decide() -> None:
    config = ApprovalsConfig(approvers=["compliance"], two_party=True)
    approvals = Approvals(config, {"alice": CallerConfig(name="alice", require_approval=["pay"])})
    assert approvals.may_decide("alice") == ("compliance",)
    assert approvals.reason("pay", {}, "alice") == "caller alice needs approval for pay"
    refuse = approvals.refuse("alice")
    assert refuse(Decision(True, "compliance")) is None
    assert "two-party" in (refuse(Decision(True, "alice")) or "")
    assert refuse(Decision(False, "alice")) is None  # the caller may still deny its own call
    assert "neither" in (refuse(Decision(True, "mallory")) or "")


def test_approvals_naming_no_tool_stop_the_start(tmp_path: Path) -> None:
    records: Any = None  # never reached: the names are checked first
    for config in (
        {"approvals": {"tools": {"ehco": {"approval": "always"}}}},
        {"auth": {"anonymous": {"name": "anonymous", "require_approval": ["ehco"]}}},
    ):
        with pytest.raises(PolicyError, match="unknown tools: ehco"):
            build_approvals(make_config(tmp_path, **config), records, all_tools())
