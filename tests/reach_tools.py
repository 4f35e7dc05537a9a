"""A sandboxed tool for tests/test_hardening.py, loaded by a service process through `tool_modules`: `reach` runs
tests/programs/reach.py, which tries to reach into the service (`hold`, in hold_tool.py, runs it to sleep)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from tools._sandbox import SandboxedTool
from tools.base import JSON, ToolConfig


class NoInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Reach(SandboxedTool[NoInput]):
    name: ClassVar[str] = "reach"
    description: ClassVar[str] = "Tries to reach into the service that runs it."
    Input: ClassVar[type[BaseModel]] = NoInput
    program: ClassVar[Path] = Path(__file__).parent / "programs" / "reach.py"
    mode: ClassVar[str] = "reach"

    async def prepare(self, args: NoInput) -> tuple[JSON, Mapping[str, Path]]:
        audit_db = str(self.config.data_dir.resolve() / "audit.db")
        return {"mode": self.mode, "service": os.getpid(), "audit_db": audit_db}, {}


class Hold(Reach):
    name: ClassVar[str] = "hold"
    description: ClassVar[str] = "Sleeps."
    mode: ClassVar[str] = "hold"


def create(config: ToolConfig) -> Reach:
    return Reach(config)
