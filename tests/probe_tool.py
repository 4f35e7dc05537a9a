"""A tool module whose name (probe_tool) is not its tool's (probe), loaded with `tool_modules`: its options come
from `tools.probe`, as for any tool. It answers with the reply its options set."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from tools.base import JSON, Tool, ToolConfig


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reply: str = "default reply"


class ProbeInput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Probe(Tool[ProbeInput]):
    name = "probe"
    description = "Answers with its configured reply."
    Input = ProbeInput

    def __init__(self, reply: str) -> None:
        self.reply = reply

    async def run(self, args: ProbeInput) -> JSON:
        return {"reply": self.reply}


def create(config: ToolConfig) -> Probe:
    return Probe(Options.model_validate(dict(config.options)).reply)
