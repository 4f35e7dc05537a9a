"""shipment_report: a late-shipment report per carrier, made by a program run in a sandbox (see tools/_sandbox.py)
over a read-only copy of the operations database. The example of a sandboxed tool."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tools._sandbox import SandboxedTool, SandboxOptions
from tools.base import JSON, ToolConfig, ToolError
from tools.policy import BreakerPolicy, TimeoutPolicy, ToolPolicy
from tools.query_database import QueryDatabase

PROGRAM = Path(__file__).parent / "data" / "programs" / "shipment_report.py"


class Options(SandboxOptions):
    model_config = ConfigDict(extra="forbid", frozen=True, title="tools.shipment_report options")

    db_path: Path | None = Field(None, description="SQLite file to report on; default <data_dir>/demo.db")


class ReportInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    carrier: str | None = Field(
        None, min_length=1, max_length=100, description="Only carriers whose name contains this (any case)."
    )
    status: Literal["late", "delayed", "exception", "in_transit", "delivered", "all"] = Field(
        "late",
        description="Which shipments: late (past the promised time, or delayed, or exception) or one status.",
    )
    top: int = Field(5, ge=1, le=50, description="How many of the worst shipments to list per carrier.")


class ShipmentReport(SandboxedTool[ReportInput]):
    name: ClassVar[str] = "shipment_report"
    description: ClassVar[str] = (
        "A report of shipments per carrier: how many match (by default: late ones), the worst and total delay "
        "in hours, and the worst shipments with tracking number, status, promised and delivered times and delay "
        "reason. Use it for carrier performance and for which shipments are late and why."
    )
    Input: ClassVar[type[BaseModel]] = ReportInput
    program: ClassVar[Path] = PROGRAM
    Options: ClassVar[type[SandboxOptions]] = Options
    # Read-only, so safe to repeat. The sandbox stops the program after options.timeout_s (10 s); this hard timeout
    # is the executor's backstop around it.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=15),
        breaker=BreakerPolicy(scope="process"),  # a sandbox on this machine: its failures are this process's
        side_effects="none",
        slow_s=3,
    )

    def __init__(self, config: ToolConfig) -> None:
        super().__init__(config)
        db_path = getattr(self.options, "db_path", None)
        # The demo database is built the way query_database builds it, on first use.
        self._demo = None if db_path else QueryDatabase(ToolConfig(data_dir=config.data_dir))
        self._db = db_path or config.data_dir / "demo.db"

    async def prepare(self, args: ReportInput) -> tuple[JSON, Mapping[str, Path]]:
        if self._demo is not None:
            await asyncio.to_thread(self._demo.ensure_demo)
        elif not self._db.is_file():
            raise ToolError(f"the database {self._db.name} is not there")
        # A copy in the program's working directory: readable by the sandbox user wherever the data folder is,
        # and nothing the program does can touch the service's file.
        return {**args.model_dump(mode="json"), "db": "ops.db"}, {"ops.db": self._db}


def create(config: ToolConfig) -> ShipmentReport:
    return ShipmentReport(config)
