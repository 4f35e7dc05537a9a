"""A tool call as the executor, its policy stages and its recorder see it: the model's request and what is known of
the run it belongs to."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context

if TYPE_CHECKING:
    from service.durable.journal import Journal
    from service.interact import Inbox


@dataclass(frozen=True, kw_only=True, slots=True)
class RunContext:
    """What the executor knows of the run a call belongs to: for audit, dead-letter, logs, traces and `requires`."""

    run_id: str
    offered: frozenset[str]
    metadata: Mapping[str, str] = field(default_factory=dict)
    succeeded: set[str] = field(default_factory=set)  # tools that have returned OK in this run
    trace_context: otel_context.Context | None = None  # the run's span: parent of every tool_call span
    remaining: Callable[[], float | None] | None = None  # seconds to the run's deadline (None: no deadline)
    inbox: Inbox | None = None  # approvals, steering and tool cancels from outside (service/interact.py)
    journal: Journal | None = None  # a durable run's checkpoints: its approvals and unsafe calls' intents


@dataclass(frozen=True, kw_only=True, slots=True)
class ToolCallRequest:
    """One tool_use block of a model turn. `parse_error` is set when the model's input cannot be used (its JSON did
    not parse or is not an object, or the turn ended before it was complete): a whole sentence the model reads as the
    call's error, as the adapter wrote it."""

    call_id: str
    name: str
    input: dict[str, Any]
    parse_error: str | None = None
