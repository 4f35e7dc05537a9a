"""shipment_tracker: live status of a shipment from its carrier's tracking API. Only a simulated API exists (the
offline demo): it fails every other request for a tracking number with a retryable 502, so a retry answers, and
treats carriers listed in `down_carriers` as down (503 every time), so the demo shows a retry and a fallback."""

from __future__ import annotations

import asyncio
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from tools.base import JSON, Tool, ToolConfig, ToolError
from tools.policy import BreakerPolicy, RetryPolicy, TimeoutPolicy, ToolPolicy


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.shipment_tracker options")

    mode: Literal["demo"] = Field("demo", description="demo: a simulated carrier API (the only mode so far)")
    down_carriers: list[str] = Field(
        default_factory=lambda: ["SK"], description="tracking-number prefixes whose carrier API is down"
    )
    latency_s: float = Field(0.02, ge=0, description="simulated API latency")


class TrackingInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the model made up is an error it reads, not ignored

    tracking_number: str = Field(
        pattern=r"^[A-Z]{2}[0-9]{9}$", description="The carrier tracking number, e.g. AT335493870."
    )


class ShipmentTracker(Tool[TrackingInput]):
    name: ClassVar[str] = "shipment_tracker"
    description: ClassVar[str] = (
        "Live tracking from the carrier's API for one shipment: status, last scan and ETA. Fresher than the "
        "operations database, but carrier APIs are flaky; when one is down, tracking_snapshot answers instead."
    )
    Input: ClassVar[type[BaseModel]] = TrackingInput
    # Carrier APIs blip: retry quickly, fall back to the database snapshot when one stays down. One tool serves
    # every carrier, so one carrier down is no reason to refuse the others: the breaker opens only when calls
    # fail nearly across the board. The demo fails 4 of every 5 attempts (SK's three, AT's first) and, run after
    # run, at most 5 in a row (SK's last two of one run, then AT's first and SK's first two of the next, before
    # AT's retry) and at most 20 of any 23 in a row (87 %): 10 in a row or 90 % of at least 20 never come.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=5),
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.1, max_backoff_s=1),
        breaker=BreakerPolicy(failure_threshold=10, failure_rate=0.9, min_calls=20, cooldown_s=30),
        fallback="tracking_snapshot",
        side_effects="none",
        slow_s=2,
    )

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._requests: dict[str, int] = {}

    async def run(self, args: TrackingInput) -> JSON:
        number = args.tracking_number
        await asyncio.sleep(self._options.latency_s)
        if number[:2] in self._options.down_carriers:
            raise ToolError(f"carrier API for {number[:2]} returned 503 Service Unavailable", retryable=True)
        seen = self._requests[number] = self._requests.get(number, 0) + 1
        if seen % 2 == 1:  # every other request fails: a flaky upstream, answered on retry
            raise ToolError("carrier API returned 502 Bad Gateway", retryable=True)
        return {
            "tracking_number": number,
            "status": "in_transit",
            "last_scan": "departed hub",
            "source": "carrier API (simulated)",
        }


def create(config: ToolConfig) -> ShipmentTracker:
    return ShipmentTracker(config)
