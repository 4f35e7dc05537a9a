"""The `effect_safe` tool: `effect` declared safe to repeat (`side_effects: none`), so a call a crash cut off runs
again (at least once) instead of ending OUTCOME_UNKNOWN."""

from __future__ import annotations

from typing import ClassVar

from effect_tool import Effect, Options

from tools.base import ToolConfig
from tools.policy import ToolPolicy


class SafeEffect(Effect):
    name = "effect_safe"
    description = "Reads something; counted."
    policy: ClassVar[ToolPolicy] = ToolPolicy(side_effects="none")


def create(config: ToolConfig) -> SafeEffect:
    return SafeEffect(Options.model_validate(dict(config.options)).log)
