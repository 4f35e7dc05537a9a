"""Redaction: the Redactor itself, then each sink read back as an operator would see it (JSON log lines, spans from an
in-memory exporter, audit and dead-letter rows from SQLite), and the caller's stream left as it was."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from conftest import run_events
from fake_tools import all_tools
from service import redact, telemetry
from service.config import Config
from service.executor import Executor, RunContext, ToolCallRequest
from service.records.audit import AuditLog, verify
from service.records.deadletter import DeadLetterStore
from service.redact import TOO_DEEP, Redactor, safe_json

EMAIL = r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+"
CARD = r"\b(?:\d[ -]?){13,19}\b"
M = "[REDACTED]"


def redactor() -> Redactor:
    return Redactor(["email", "card_number", "ssn"], [EMAIL, CARD])


@pytest.fixture(autouse=True)
def no_redactor_after() -> Iterator[None]:
    """build_executor installs the process-wide redactor: put the no-op one back after each test."""
    yield
    redact.install(Redactor())


def test_fields_are_masked_anywhere_by_key_ignoring_case_and_separators() -> None:
    data = {
        "Email": "a@b.example",
        "customer": {"cardNumber": 4111111111111111, "name": "Ada", "SSN": {"nested": "x"}},
        "rows": [{"card-number": "x"}, ("keep", {"EMAIL": None})],
    }
    assert redactor().value(data) == {
        "Email": M,
        "customer": {"cardNumber": M, "name": "Ada", "SSN": M},
        "rows": [{"card-number": M}, ("keep", {"EMAIL": M})],
    }


def test_patterns_are_masked_inside_strings() -> None:
    r = redactor()
    assert r.text("mail ada@example.com, card 4111 1111 1111 1111, order 42") == f"mail {M}, card {M}, order 42"
    assert r.value(["ada@example.com", 7, None, 1.5]) == [M, 7, None, 1.5]


def test_patterns_are_masked_in_keys_and_numbers_too() -> None:
    """Data keyed by an e-mail address, and a card number sent as a JSON number, are the same secrets as strings."""
    r = redactor()
    data = {"alice@example.com": {"note": "hi"}, "bob@example.com": 1, "amount": 4111111111111111, "n": 42}
    assert r.value(data) == {M: {"note": "hi"}, f"{M} #2": 1, "amount": M, "n": 42}
    assert r.value([4111111111111111, 3.5, True, None]) == [M, 3.5, True, None]


def test_deep_input_is_cut_not_a_recursion_error() -> None:
    deep: Any = "x"
    for _ in range(sys.getrecursionlimit() * 3):
        deep = {"a": [deep]}
    masked = redactor().value(deep)
    assert json.dumps(masked).count("[") < 100 and TOO_DEEP in json.dumps(masked)
    assert json.loads(safe_json(deep)) == "<not recordable as JSON: RecursionError>"


def test_nothing_configured_is_a_no_op() -> None:
    off = Redactor()
    data = {"email": "a@b.example"}
    assert not off.enabled and off.value(data) is data and off.text("a@b.example") == "a@b.example"


def test_the_default_config_masks_credentials_a_tool_input_carries() -> None:
    """An outside finding: http_request's Authorization and Cookie headers were stored as sent in the audit log and
    dead letters, since nothing was masked by default."""
    r = Redactor.from_config(Config().redaction)
    headers = {"Authorization": "Bearer leak-me", "cookie": "c=1", "X-Api-Key": "k", "Accept": "application/json"}
    assert r.value({"url": "https://x.example", "headers": headers}) == {
        "url": "https://x.example",
        "headers": {
            "Authorization": "[REDACTED]",
            "cookie": "[REDACTED]",
            "X-Api-Key": "[REDACTED]",
            "Accept": "application/json",
        },
    }
    assert not Redactor.from_config(Config.model_validate({"redaction": {"fields": []}}).redaction).enabled


def test_config_section_and_bad_patterns() -> None:
    config = Config.model_validate({"redaction": {"fields": ["email"], "patterns": [EMAIL], "mask": "***"}})
    r = Redactor.from_config(config.redaction)
    assert r.value({"email": 1, "note": "to a@b.example"}) == {"email": "***", "note": "to ***"}
    with pytest.raises(ValidationError, match="bad redaction pattern"):
        Config.model_validate({"redaction": {"patterns": ["(unclosed"]}})
    with pytest.raises(ValidationError):
        Config.model_validate({"redaction": {"field": ["email"]}})


def test_json_log_lines_mask_extras_arguments_and_tracebacks() -> None:
    formatter = telemetry.JsonFormatter(redactor())
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "lookup for %s by %s", None, None)
    record.args = ({"email": "ada@example.com", "id": 7}, "bob@example.com")
    record.__dict__.update({"customer": {"ssn": "123-45-6789", "tier": "gold"}, "error": "no card 4111111111111111"})
    try:
        raise ValueError("bad input from ada@example.com")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = json.loads(formatter.format(record))
    assert line["msg"] == f"lookup for {{'email': '{M}', 'id': 7}} by {M}"
    assert line["customer"] == {"ssn": M, "tier": "gold"}
    assert line["error"] == f"no card {M}"
    assert "ada@example.com" not in line["exc"] and f"bad input from {M}" in line["exc"]


def test_the_process_wide_redactor_applies_to_the_default_formatter() -> None:
    record = logging.LogRecord("t", logging.INFO, __file__, 1, "from %s", ("ada@example.com",), None)
    assert "ada@example.com" in telemetry.JsonFormatter().format(record)
    redact.install(redactor())
    assert "ada@example.com" not in telemetry.JsonFormatter().format(record)


async def test_spans_audit_and_dead_letters_are_masked(tmp_path: Path, spans: InMemorySpanExporter) -> None:
    r = redactor()
    audit = AuditLog(tmp_path / "audit.db", redactor=r)
    dead = DeadLetterStore(tmp_path / "dead.db", redactor=r)
    ex = Executor(all_tools(), audit=audit, dead_letter=dead, redactor=r)
    run = RunContext(run_id="run_r", offered=frozenset({"fail"}), metadata={"email": "ops@example.com", "team": "a"})
    call = ToolCallRequest(
        call_id="c1", name="fail", input={"text": "ada@example.com", "card_number": "4111 1111 1111 1111"}
    )
    events = [e async for e in ex.execute(call, run)]
    await ex.aclose()
    assert events[-1].error == "cannot do ada@example.com"  # type: ignore[attr-defined]  # the model's copy

    (span,) = [s for s in spans.get_finished_spans() if s.name == "tool_call"]
    attributes = dict(span.attributes or {})
    assert json.loads(str(attributes["tool.input"])) == {"card_number": M, "text": M}
    assert attributes["tool.error"] == f"cannot do {M}"
    assert span.status.description == f"error: cannot do {M}"

    db = sqlite3.connect(tmp_path / "audit.db")
    metadata, stored_input = db.execute("SELECT metadata, input FROM audit").fetchone()
    db.close()
    assert json.loads(metadata) == {"email": M, "team": "a"}
    assert json.loads(stored_input) == {"card_number": M, "text": M}
    assert verify(tmp_path / "audit.db").ok  # the chain is over the rows as stored

    db = sqlite3.connect(tmp_path / "dead.db")
    stored_input, message, traceback = db.execute("SELECT input, message, traceback FROM dead_letters").fetchone()
    db.close()
    assert json.loads(stored_input) == {"card_number": M, "text": M}
    assert message == f"cannot do {M}"
    assert "ada@example.com" not in traceback and "ToolError" in traceback


async def test_a_configured_service_masks_its_records_not_the_callers_stream(
    start_service: Any, channel_to: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    turns = [
        {"text": "Calling fail.", "tool_calls": [{"name": "fail", "input": {"text": "ada@example.com"}}]},
        {"text": "Done: {results}"},
    ]
    svc = await start_service(turns, redaction={"fields": ["email"], "patterns": [EMAIL]})
    with caplog.at_level(logging.INFO):
        events = await run_events(channel_to(svc), message="hi", metadata={"email": "ops@example.com"})
    ready = next(e for e in events if e.WhichOneof("event") == "tool_call_ready")
    assert ready.tool_call_ready.input["text"] == "ada@example.com"  # the caller sees the call as it was
    failed = next(e for e in events if e.WhichOneof("event") == "execution_failed")
    await svc.close()

    lines = [telemetry.JsonFormatter().format(r) for r in caplog.records]
    assert lines and not [line for line in lines if "ada@example.com" in line]
    db = sqlite3.connect(tmp_path / "var" / "audit.db")
    metadata, stored_input = db.execute("SELECT metadata, input FROM audit").fetchone()
    assert json.loads(metadata)["email"] == M and json.loads(stored_input) == {"text": M}
    db.close()
    db = sqlite3.connect(tmp_path / "var" / "deadletter.db")
    row = db.execute(
        "SELECT input, message FROM dead_letters WHERE execution_id = ?", (failed.execution_failed.execution_id,)
    )
    assert row.fetchone() == (f'{{"text":"{M}"}}', f"cannot do {M}")
    db.close()
