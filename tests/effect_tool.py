"""The `effect` tool for the durable-run process tests: a side effect that may not be repeated (`side_effects:
unsafe`, the default). Each execution appends its idempotency key to the file `tools.effect.log`, then holds while
the file `<log>.hold` exists, so that a test can kill its process mid-call and count executions across processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict

from tools.base import JSON, Tool, ToolConfig, current_call
from tools.policy import ToolPolicy


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    log: Path


class EffectInput(BaseModel):
    text: str


class Effect(Tool[EffectInput]):
    name = "effect"
    description = "Does something once; counted."
    Input = EffectInput
    policy: ClassVar[ToolPolicy] = ToolPolicy(side_effects="unsafe")

    def __init__(self, log: Path) -> None:
        self.log = log

    async def run(self, args: EffectInput) -> JSON:
        call = current_call()
        with self.log.open("a") as f:  # one short line, appended whole: the test counts them
            f.write(f"{call.idempotency_key if call else '-'}\n")
        hold = self.log.with_name(self.log.name + ".hold")
        while hold.exists():  # noqa: ASYNC110 (the test's process removes it: no event to wait on)
            await asyncio.sleep(0.02)
        return {"done": args.text}


def create(config: ToolConfig) -> Effect:
    return Effect(Options.model_validate(dict(config.options)).log)
