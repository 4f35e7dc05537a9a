"""Tools for tests: each shows one behaviour (echo, slow, failing, buggy, streaming) and records what happened."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, Field

from tools.base import JSON, Tool, ToolError


class EchoInput(BaseModel):
    text: str = Field(max_length=100)
    times: int = Field(default=1, ge=1, le=3)


class Echo(Tool[EchoInput]):
    name = "echo"
    description = "Echoes text."
    Input = EchoInput

    async def run(self, args: EchoInput) -> JSON:
        return {"echo": args.text * args.times}


class SleepInput(BaseModel):
    seconds: float = Field(ge=0, le=60)


class Sleep(Tool[SleepInput]):
    """Sleeps; counts starts, finishes and cancellations so tests can see that cancellation reached it."""

    name = "sleep"
    description = "Sleeps for a while."
    Input = SleepInput

    def __init__(self) -> None:
        self.started = 0
        self.finished = 0
        self.cancelled = 0
        self.running = asyncio.Event()

    async def run(self, args: SleepInput) -> JSON:
        self.started += 1
        self.running.set()
        try:
            await asyncio.sleep(args.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return {"slept": args.seconds}


class Fail(Tool[EchoInput]):
    name = "fail"
    description = "Always fails."
    Input = EchoInput

    async def run(self, args: EchoInput) -> JSON:
        raise ToolError(f"cannot do {args.text}")


class Buggy(Tool[EchoInput]):
    name = "buggy"
    description = "Has a bug."
    Input = EchoInput

    async def run(self, args: EchoInput) -> JSON:
        return {"oops": 1 / 0}


class CountInput(BaseModel):
    n: int = Field(ge=0, le=100)


class Count(Tool[CountInput]):
    name = "count"
    description = "Streams the numbers 0..n-1."
    Input = CountInput
    streaming = True

    def total_chunks(self, args: CountInput) -> int | None:
        return args.n

    async def stream(self, args: CountInput) -> AsyncIterator[JSON]:
        for i in range(args.n):
            await asyncio.sleep(0)
            yield {"i": i}


class MeetInput(BaseModel):
    who: str


class Meet(Tool[MeetInput]):
    """Returns only once `party` calls are in progress at the same time: proves calls run concurrently."""

    name = "meet"
    description = "Waits for the others."
    Input = MeetInput

    def __init__(self, party: int = 2) -> None:
        self.party = party
        self.arrived = 0
        self.all_here = asyncio.Event()

    async def run(self, args: MeetInput) -> JSON:
        self.arrived += 1
        if self.arrived >= self.party:
            self.all_here.set()
        await self.all_here.wait()
        return {"met": args.who}


def all_tools() -> dict[str, Tool[Any]]:
    tools: list[Tool[Any]] = [Echo(), Sleep(), Fail(), Buggy(), Count(), Meet()]
    return {t.name: t for t in tools}


# Fault-injecting tools for the policy tests: each fails in one way and counts its calls.


class Flaky(Tool[EchoInput]):
    """Fails `failures` times (retryably unless told otherwise), then succeeds."""

    name = "flaky"
    description = "Fails a few times, then works."
    Input = EchoInput

    def __init__(self, failures: int = 2, *, retryable: bool = True, name: str = "flaky") -> None:
        self.failures = failures
        self.retryable = retryable
        self.calls = 0
        self.name = name  # type: ignore[misc]

    async def run(self, args: EchoInput) -> JSON:
        self.calls += 1
        if self.calls <= self.failures:
            raise ToolError(f"upstream 503 (call {self.calls})", retryable=self.retryable)
        return {"echo": args.text, "calls": self.calls}


class Hang(Tool[EchoInput]):
    """Never returns; counts cancellations."""

    name = "hang"
    description = "Hangs."
    Input = EchoInput

    def __init__(self) -> None:
        self.calls = 0
        self.cancelled = 0

    async def run(self, args: EchoInput) -> JSON:
        self.calls += 1
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return None  # pragma: no cover


class StreamThenHang(Tool[CountInput]):
    """Streams `n` chunks, then hangs."""

    name = "stream_hang"
    description = "Streams a little, then hangs."
    Input = CountInput
    streaming = True

    async def stream(self, args: CountInput) -> AsyncIterator[JSON]:
        for i in range(args.n):
            yield {"i": i}
        await asyncio.Event().wait()


class Stubborn(Tool[EchoInput]):
    """Ignores cancellation until `release` is set, as a tool that swallows CancelledError, or is stuck in code that
    cannot be cancelled, would. Not in the default sets: a test that uses it sets `release` before it ends, or the
    event loop's own shutdown would wait for it."""

    name = "stubborn"
    description = "Ignores cancellation."
    Input = EchoInput

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.running = asyncio.Event()
        self.cancels = 0
        self.ended = 0

    async def hold(self) -> None:
        self.running.set()
        while not self.release.is_set():
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancels += 1  # swallowed, which is the point
        self.ended += 1

    async def run(self, args: EchoInput) -> JSON:
        await self.hold()
        return {"late": args.text}


class StubbornStream(Stubborn):
    """Streams one chunk, then ignores cancellation as `Stubborn` does."""

    name = "stubborn_stream"
    streaming = True

    async def stream(self, args: EchoInput) -> AsyncIterator[JSON]:
        yield {"i": 0}
        await self.hold()


class Backup(Tool[EchoInput]):
    """A fallback: answers anything an EchoInput tool was asked."""

    name = "backup"
    description = "Answers when the primary cannot."
    Input = EchoInput

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, args: EchoInput) -> JSON:
        self.calls += 1
        return {"backup": args.text}


class Counted(Tool[EchoInput]):
    """Echo that counts its calls (for the cache)."""

    name = "counted"
    description = "Counts calls."
    Input = EchoInput

    def __init__(self) -> None:
        self.calls = 0

    async def run(self, args: EchoInput) -> JSON:
        self.calls += 1
        return {"echo": args.text, "calls": self.calls}


def policy_tools(**flaky: Any) -> dict[str, Tool[Any]]:
    """The fault-injecting tools, plus echo; `flaky` goes to `Flaky(...)`."""
    tools: list[Tool[Any]] = [Echo(), Flaky(**flaky), Hang(), StreamThenHang(), Backup(), Counted(), Buggy(), Sleep()]
    return {t.name: t for t in tools}


class BulkInput(BaseModel):
    rows: int = Field(ge=0, le=100_000)


class Bulky(Tool[BulkInput]):
    """Returns `rows` rows of 1000 characters and a number, as query_database returns rows: 4200 of them are just
    over 4 MiB."""

    name = "bulky"
    description = "Returns a lot of data."
    Input = BulkInput

    async def run(self, args: BulkInput) -> JSON:
        return {"columns": ["text", "n"], "rows": [[f"{i:08d}" + "é" * 496, i] for i in range(args.rows)]}


class BulkyStream(Tool[BulkInput]):
    """Streams two chunks of `rows` rows each (see Bulky)."""

    name = "bulky_stream"
    description = "Streams a lot of data."
    Input = BulkInput
    streaming = True

    async def stream(self, args: BulkInput) -> AsyncIterator[JSON]:
        for chunk in range(2):
            yield [[f"{chunk}:{i:08d}" + "x" * 990, i] for i in range(args.rows)]
