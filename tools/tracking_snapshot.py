"""tracking_snapshot: a shipment's last known status from the operations database (updated by carrier feeds, so
it may lag the carrier by hours). The fallback of shipment_tracker: same input, always available."""

from __future__ import annotations

from typing import ClassVar

from pydantic import BaseModel

from tools.base import JSON, Tool, ToolConfig, ToolError
from tools.policy import BreakerPolicy, CachePolicy, TimeoutPolicy, ToolPolicy
from tools.query_database import Options, QueryDatabase, QueryInput
from tools.shipment_tracker import TrackingInput

_SQL = (
    "SELECT s.tracking_number, s.status, s.shipped_at, s.promised_at, s.delivered_at, s.delay_reason, "
    "c.name AS carrier FROM shipments s JOIN carriers c ON c.id = s.carrier_id WHERE s.tracking_number = ?"
)


__all__ = ["Options", "TrackingSnapshot", "create"]  # its options (`tools.tracking_snapshot`) are the database's


class TrackingSnapshot(Tool[TrackingInput]):
    name: ClassVar[str] = "tracking_snapshot"
    description: ClassVar[str] = (
        "Last known status of one shipment from the operations database: status, dates, delay reason, carrier. "
        "May lag the carrier by hours; prefer shipment_tracker for live status."
    )
    Input: ClassVar[type[BaseModel]] = TrackingInput
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=10),
        breaker=BreakerPolicy(scope="process"),  # the local operations database: its failures are this process's
        side_effects="none",
        cache=CachePolicy(ttl_s=60),
    )

    def __init__(self, config: ToolConfig) -> None:
        self._db = QueryDatabase(ToolConfig(data_dir=config.data_dir, options=config.options))

    async def run(self, args: TrackingInput) -> JSON:
        result = await self._db.run(QueryInput(sql=_SQL, params=[args.tracking_number], limit=1))
        if not result["rows"]:
            raise ToolError(f"no shipment with tracking number {args.tracking_number}")
        row = dict(zip(result["columns"], result["rows"][0], strict=True))
        return {**row, "source": "operations database snapshot"}

    async def aclose(self) -> None:
        await self._db.aclose()


def create(config: ToolConfig) -> TrackingSnapshot:
    return TrackingSnapshot(config)
