"""The `hold` tool for tests/test_hardening.py: the reach program, sleeping (a module has one tool)."""

from __future__ import annotations

from reach_tools import Hold

from tools.base import ToolConfig


def create(config: ToolConfig) -> Hold:
    return Hold(config)
