"""Which tool calls wait for a decision before they run, who may decide, and for how long (`service/approvals.py`
applies it; docs/interactive.md explains it)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from service.config.base import Section

Op = Literal["eq", "ne", "gt", "ge", "lt", "le", "in", "not_in", "prefix", "not_prefix", "matches", "exists"]


class Condition(Section):
    """One test on the validated input: the value at `pointer` (RFC 6901, e.g. `/amount`, `/to/0/host`) against
    `value`. A pointer that names nothing makes every test but `exists: false` false."""

    pointer: str = Field(pattern=r"^(/.*)?$", description="JSON pointer into the tool's validated input")
    op: Op = Field(description="comparison: eq ne gt ge lt le in not_in prefix not_prefix matches (regex) exists")
    value: Any = Field(default=None, description="what the input's value is compared with (a list for in / not_in)")


class WhenRule(Section):
    """Approval when any of `any` holds (or all of `all`, when given)."""

    any: list[Condition] = Field(default_factory=list, description="approval is needed when one of these holds")
    all: list[Condition] = Field(default_factory=list, description="… or when all of these hold (if any are given)")

    @model_validator(mode="after")
    def _not_empty(self) -> WhenRule:
        if not self.any and not self.all:
            raise ValueError("approvals.tools: a `when` rule needs conditions under `any` or `all`")
        return self


class ToolApproval(Section):
    """`approval: always | never`, or `when: {any: [...]}` for a rule on the input."""

    approval: Literal["always", "never", "when"] = Field(default="never", description="always | never | when")
    when: WhenRule | None = Field(default=None, description="the rule, with approval: when")

    @model_validator(mode="after")
    def _rule_matches_mode(self) -> ToolApproval:
        if (self.approval == "when") != (self.when is not None):
            raise ValueError("approvals.tools: `when` is given with (and only with) approval: when")
        return self


class ApprovalsConfig(Section):
    """Approvals of tool calls: per tool here, per caller in `auth.callers[].require_approval`."""

    tools: dict[str, ToolApproval] = Field(default_factory=dict, description="per tool name: when approval is needed")
    approvers: list[str] = Field(
        default_factory=list, description="caller names that may decide on any run's calls (besides its caller)"
    )
    two_party: bool = Field(
        default=False, description="a run's own caller may not approve its calls (it may still deny them)"
    )
    timeout_s: float = Field(
        default=300.0, gt=0, description="a call nobody decided on within this is denied, the model told why"
    )

    @model_validator(mode="after")
    def _someone_can_approve(self) -> ApprovalsConfig:
        if self.two_party and not self.approvers:
            raise ValueError("approvals.two_party needs approvers: nobody else could approve a call")
        return self
