"""A bench-only tool, loaded with `tool_modules: [bench.bench_sleep]`: sleeps for `tools.bench_sleep.latency_ms`,
standing in for a tool call of known latency."""

from __future__ import annotations

import asyncio

from pydantic import BaseModel, ConfigDict, Field

from tools.base import JSON, Tool, ToolConfig


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid")
    latency_ms: float = Field(default=100.0, ge=0)


class SleepInput(BaseModel):
    note: str = Field(default="", max_length=100)


class BenchSleep(Tool[SleepInput]):
    name = "bench_sleep"
    description = "Waits a fixed time, then answers (benchmark tool)."
    Input = SleepInput

    def __init__(self, latency_s: float) -> None:
        self.latency_s = latency_s

    async def run(self, args: SleepInput) -> JSON:
        await asyncio.sleep(self.latency_s)
        return {"slept_ms": round(self.latency_s * 1000), "note": args.note}


def create(config: ToolConfig) -> BenchSleep:
    return BenchSleep(Options.model_validate(dict(config.options)).latency_ms / 1000)
