"""The first stage of a tool call: whether it may run at all. An unknown tool, input the model's JSON did not give,
input the tool refuses, or a tool whose `requires` have not succeeded in this run: the call is rejected and the tool
never runs."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from service.events import ToolStatus as S
from service.policy.attempt import Outcome
from service.policy.call import RunContext, ToolCallRequest
from tools.base import Tool
from tools.policy import ToolPolicy

log = logging.getLogger(__name__)


def admit(
    call: ToolCallRequest, run: RunContext, tools: Mapping[str, Tool[Any]], policies: Mapping[str, ToolPolicy]
) -> tuple[Tool[Any], Any] | Outcome:
    """The tool and its validated input, or why the call is refused before it runs (status rejected)."""
    tool = tools.get(call.name) if call.name in run.offered else None
    if tool is None:
        available = ", ".join(sorted(run.offered)) or "none"
        return Outcome(S.REJECTED, error=f"unknown tool {call.name!r}; available tools: {available}")
    if call.parse_error is not None:
        return Outcome(S.REJECTED, error=call.parse_error)
    try:
        args = tool.validate(call.input)
    except Exception as exc:
        return Outcome(S.REJECTED, error=f"invalid input for {call.name}: {invalid(exc, call.name)}")
    policy = policies[tool.name]
    needed = missing(policy, run) if policy.requires else None
    if needed:
        return Outcome(
            S.REJECTED,
            error=f"{call.name} can only run after {', '.join(needed)} succeeded in this run: call {needed[0]} first",
        )
    return tool, args


def missing(policy: ToolPolicy, run: RunContext) -> list[str]:
    """The tools `policy` requires that have not succeeded in this run yet."""
    return [name for name in policy.requires if name not in run.succeeded]


def invalid(exc: Exception, tool: str) -> str:
    """Why `tool.validate` refused an input, for the model. Not only pydantic errors: input nested deeper than the
    validator goes raises RecursionError, and a tool's own rules may raise anything; none of it may end the run."""
    if isinstance(exc, ValidationError):
        return describe(exc)
    if isinstance(exc, RecursionError):
        return "the input is nested too deeply"
    if not isinstance(exc, ValueError | TypeError):
        log.exception("validating input for %s raised", tool)
    return f"{type(exc).__name__}: {exc}"[:500]


def describe(exc: ValidationError) -> str:
    """Pydantic errors as one line the model can act on: `limit: Input should be less than or equal to 1000`."""
    parts = []
    for err in exc.errors(include_url=False):
        loc = [str(p) for p in err["loc"]]
        if len(loc) > 8:  # deeply nested input: the path's ends say where, the middle would be kilobytes
            loc = [*loc[:3], "…", *loc[-3:]]
        parts.append(f"{'.'.join(loc) or 'input'}: {err['msg']}")
    return "; ".join(parts)[:2000]
