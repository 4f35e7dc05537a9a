"""The harness's callers: each drives one run to its end through a fleet whose replicas die under it, as a careful
caller behind a load balancer would. A streaming caller (`RunAgent`, `on_disconnect: CONTINUE`) or a background one
(`SubmitRun`) starts the run on a random live replica, retrying with its idempotency key while it has no run id;
once it has one, a broken stream is followed by `WatchRun(run_id, after_seq=last seq seen)` on another live replica.
Everything seen is kept for the checks: the seqs received, the run's end, the statuses of the broken calls."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from bench.chaos.fleet import Fleet, Replica

# Statuses a caller reads as "this replica is gone or going, try another": the stream broke with its process, or it
# refused us while draining. Any other status ends the run for the caller, and the checks report it.
RETRY = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


@dataclass
class Seen:
    """What one caller saw of its run."""

    label: str
    mode: str  # "stream" or "submit"
    run_id: str = ""
    received: list[int] = field(default_factory=list)  # every seq the caller was sent, in order (merged deltas span)
    events: list[pb.AgentEvent] = field(default_factory=list)  # what it was sent, across its reconnections
    end: str = ""  # "final_response" or "error", from the last event; "" if the caller never saw one
    error: str = ""  # the run's error event (code: message), or the status that stopped the caller
    breaks: list[str] = field(default_factory=list)  # the statuses of the calls that broke under the caller
    resent: int = 0  # seqs sent again after a restart (one node), the held ones dropped
    started: float = 0.0
    ended: float = 0.0


class Callers:
    """Keeps `in_flight` runs going (half streamed, half submitted) until `stop()`, then lets them end."""

    def __init__(self, fleet: Fleet, in_flight: int, *, seed: int = 0, deadline_s: float = 120.0) -> None:
        self.fleet = fleet
        self.in_flight = in_flight
        self.deadline_s = deadline_s  # a run not ended this long after its start is abandoned (and reported)
        self.random = random.Random(seed)
        self.seen: list[Seen] = []
        self._stopping = asyncio.Event()
        self._channels: dict[str, grpc.aio.Channel] = {}

    def stop(self) -> None:
        self._stopping.set()

    async def run(self, max_runs: int | None = None) -> None:
        """Run `in_flight` callers, each starting a new run when its last ends, until `stop()` (or `max_runs`)."""
        await asyncio.gather(*(self._caller(i, max_runs) for i in range(self.in_flight)))
        for channel in self._channels.values():
            await channel.close()

    async def _caller(self, index: int, max_runs: int | None) -> None:
        while not self._stopping.is_set() and (max_runs is None or len(self.seen) < max_runs):
            seen = Seen(f"c{len(self.seen)}", "stream" if len(self.seen) % 2 == 0 else "submit")
            self.seen.append(seen)
            seen.started = time.time()
            try:
                await asyncio.wait_for(self._drive(seen), self.deadline_s)
            except TimeoutError:
                seen.error = seen.error or f"no end within {self.deadline_s:g} s"
            seen.ended = time.time()

    def _stub(self, replica: Replica) -> agent_pb2_grpc.AgentServiceStub:
        channel = self._channels.get(replica.target)
        if channel is None:
            channel = self._channels[replica.target] = grpc.aio.insecure_channel(replica.target)
        return agent_pb2_grpc.AgentServiceStub(channel)

    async def _replica(self) -> Replica:
        # a short poll: every replica is down only between a kill and a restart, rare enough not to need an event
        while not (live := self.fleet.live()):  # noqa: ASYNC110
            await asyncio.sleep(0.05)
        return self.random.choice(live)

    def _request(self, seen: Seen) -> pb.RunAgentRequest:
        return pb.RunAgentRequest(
            message=f"chaos:{seen.label} please do the thing",
            tools=["http_request"],
            on_disconnect=pb.RunAgentRequest.CONTINUE,
            idempotency_key=f"chaos-{seen.label}",
        )

    async def _drive(self, seen: Seen) -> None:
        while not seen.end:
            stub = self._stub(await self._replica())
            try:
                if seen.run_id:
                    await self._read(seen, stub.WatchRun(pb.WatchRunRequest(run_id=seen.run_id, after_seq=_last(seen))))
                elif seen.mode == "stream":
                    await self._read(seen, stub.RunAgent(self._request(seen)))
                else:
                    seen.run_id = (await stub.SubmitRun(self._request(seen), timeout=10)).run_id
            except grpc.aio.AioRpcError as err:
                if err.code() not in RETRY:
                    seen.error = f"{err.code().name}: {err.details()}"
                    return
                seen.breaks.append(err.code().name)
                await asyncio.sleep(0.05)
            except TimeoutError:
                seen.breaks.append("TIMEOUT")

    async def _read(self, seen: Seen, call: AsyncIterator[pb.AgentEvent]) -> None:
        async for event in call:
            seen.run_id = seen.run_id or event.run_id
            first = event.first_seq or event.seq
            if seen.received and first <= seen.received[-1]:
                # one node: a restart re-sends from its run_recovered, which may replace seqs the dead process sent
                # ahead of its log; a careful caller drops what it holds from that seq on (embedded-durability.md)
                seen.resent += seen.received[-1] - first + 1
                del seen.received[first - 1 :]
                seen.events = [e for e in seen.events if e.seq < first]
            seen.received.extend(range(first, event.seq + 1))
            seen.events.append(event)
            kind = event.WhichOneof("event")
            if kind in ("final_response", "error"):
                seen.end = kind
                if kind == "error":
                    seen.error = f"{event.error.code}: {event.error.message}"


def _last(seen: Seen) -> int:
    return seen.received[-1] if seen.received else 0
