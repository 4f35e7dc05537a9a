"""What the two kinds of records are, and what a row of each stores: the same for the SQLite files and PostgreSQL,
so both backends (and their command-line tools) import them from here rather than from each other."""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import fields as dataclass_fields
from typing import Any

from service.records.sqlite import storable
from service.redact import Redactor, safe_json


@dataclass(frozen=True, kw_only=True, slots=True)
class AuditRecord:
    """One tool call as the executor saw it. `data` is the JSON result; its size is measured on the writer thread."""

    ts: float
    run_id: str
    metadata: dict[str, str]
    tool: str
    call_id: str
    input: Any
    status: str
    duration_s: float
    attempts: int
    cache_hit: bool
    answered_by: str
    data: Any = None
    error: str = ""
    trace_id: str = ""  # kept (and signed) by the PostgreSQL log; the SQLite file has no column for it


def audit_row(r: AuditRecord, redactor: Redactor) -> dict[str, Any]:
    """A record as the chain's fields store it (all but `seq`): redacted, JSON columns as ASCII text (safe_json
    escapes), text from the model made storable, the result's size measured."""
    size = len(safe_json(r.data)) if r.status in ("ok", "partial") else len(storable(r.error).encode())
    return {
        "ts": r.ts,
        "run_id": storable(r.run_id),
        "metadata": safe_json(redactor.value(dict(r.metadata))),
        "tool": storable(r.tool),
        "call_id": storable(r.call_id),
        "input": safe_json(redactor.value(r.input)),
        "status": r.status,
        "duration_s": r.duration_s,
        "result_bytes": size,
        "attempts": r.attempts,
        "cache_hit": int(r.cache_hit),
        "answered_by": storable(r.answered_by),
    }


@dataclass(frozen=True, kw_only=True, slots=True)
class DeadLetter:
    execution_id: str
    created_at: float
    run_id: str
    call_id: str
    tool: str
    input: dict[str, Any]
    status: str
    error_type: str
    message: str
    traceback: str
    attempts: int
    trace_id: str = ""


def letter_row(letter: DeadLetter, redactor: Redactor) -> dict[str, Any]:
    """A letter as stored: input as JSON text, input, message and traceback redacted, text made storable."""
    # Not asdict(): it deep-copies the input, and hostile input can be nested too deeply for that.
    row = {f.name: getattr(letter, f.name) for f in dataclass_fields(letter)}
    row = {name: storable(v) if type(v) is str else v for name, v in row.items()}  # see storable()
    row["input"] = safe_json(redactor.value(letter.input))
    row["message"] = storable(redactor.text(letter.message))
    row["traceback"] = storable(redactor.text(letter.traceback))
    return row
