"""Whether a tool call may be run again, and the result of one that may not: what recovering a run after a crash
needs for the calls the crash cut off (docs/design/replicas-and-durability.md, "Intent before side effects").

A call is safe to repeat when what it may change (`side_effects`: its policy's, which `policies.<name>` overrides,
then the tool's own answer for this input, `Tool.side_effects_of`) is "none" or "idempotent". One that is not is
never sent again unasked: it ends `OUTCOME_UNKNOWN`, which tells the model and the caller that its side effect may or
may not have happened. Nothing reports that status yet but `Executor.resume`, which recovery will call.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from service.events import ToolResult, ToolStatus
from service.policy.call import ToolCallRequest
from tools.base import Tool
from tools.policy import SideEffects, ToolPolicy

INTERRUPTED = "the process running it stopped before its result was recorded"


def side_effects(
    call: ToolCallRequest, tools: Mapping[str, Tool[Any]], policies: Mapping[str, ToolPolicy]
) -> SideEffects:
    """What `call` may change. A call the executor would refuse (unknown tool, input that does not parse or
    validate) changes nothing: it never reaches its tool, whether it is sent once or again."""
    tool = tools.get(call.name)
    if tool is None or call.parse_error is not None:
        return "none"
    try:
        args = tool.validate(call.input)
    except Exception:  # the executor rejects it (and tells the model why) when it is run: it never runs
        return "none"
    return tool.side_effects_of(args, policies[call.name].side_effects)


def repeat_safe(call: ToolCallRequest, tools: Mapping[str, Tool[Any]], policies: Mapping[str, ToolPolicy]) -> bool:
    """Whether `call` may be run again without risking its side effect twice."""
    return side_effects(call, tools, policies) != "unsafe"


def unknown_error(tool: str, why: str = INTERRUPTED) -> str:
    """What the model reads (after "outcome unknown: ") and the caller sees as the call's error."""
    return (
        f"the call to {tool} was interrupted ({why}) and was not retried, because repeating it could repeat its side "
        "effect; it may or may not have taken effect: check before repeating it"
    )


def outcome_unknown(call_id: str, tool: str, *, why: str = INTERRUPTED, attempts: int = 1) -> ToolResult:
    """The result of a call not safe to repeat that `why` cut off: `attempts` were started, none known to end."""
    return ToolResult(
        call_id=call_id,
        name=tool,
        status=ToolStatus.OUTCOME_UNKNOWN,
        duration_s=0.0,
        error=unknown_error(tool, why),
        attempts=attempts,
    )
