"""A tool's policy stages after admission, composed once per tool:

    cache     an idempotent tool's result for the same input, within its TTL      → ok, cache_hit
    guarded   rate limit, then attempts under breaker and timeout, with retries   (`guarded.py`)
    fallback  on final failure or open circuit, the same input to another tool     (`fallback.py`)

`Pipeline.run` yields the call's events, then one `Outcome`. The stage objects are built once per executor; a call
allocates only what it must (its chunk counter and outcomes), never a closure or a generator per stage. A tool that
answers in one piece and has no cache starts with `Pipeline.first`, a coroutine: most calls end there, with no
generator at all, and the others go on in `run(first=...)`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.events import Event, ToolResultChunk
from service.events import ToolStatus as S
from service.policy.attempt import ChunkCounter, Outcome
from service.policy.cache import ResultCache, cache_key
from service.policy.call import RunContext, ToolCallRequest
from service.policy.fallback import FALLBACK_ON, fall_back, usable
from service.policy.guarded import first_attempt, guarded, settled
from service.policy.guards import Guards
from service.policy.observer import CallObserver
from tools.base import Tool


class Pipeline:
    """One tool's stages: its guards, and its fallback's tool and guards when its policy names one."""

    __slots__ = ("fallback", "guards", "quick", "tool")

    def __init__(self, tool: Tool[Any], guards: Guards, fallback: tuple[Tool[Any], Guards] | None = None) -> None:
        self.tool = tool
        self.guards = guards
        self.fallback = fallback
        self.quick = not tool.streaming and guards.cache is None  # whether calls may start with `first`

    def first(self, call: ToolCallRequest, run: RunContext, args: Any, observer: CallObserver) -> Awaitable[Outcome]:
        """The rate limit and attempt 1 of a `quick` pipeline's call (`first_attempt`'s coroutine itself, no frame
        of its own); `done` says whether that is the call's outcome, else `run(first=...)` goes on from it."""
        return first_attempt(self.tool, args, self.guards, run_id=run.run_id, call_id=call.call_id, observer=observer)

    def done(self, first: Outcome) -> bool:
        """Whether `first` is the call's outcome: no retry to make and no fallback to try."""
        return settled(first, 1, self.guards.policy.retry.attempts) and (
            self.fallback is None or first.status not in FALLBACK_ON
        )

    async def run(
        self,
        call: ToolCallRequest,
        run: RunContext,
        args: Any,
        observer: CallObserver,
        sleep: Callable[[float], Awaitable[None]],
        first: Outcome | None = None,
    ) -> AsyncIterator[Event | Outcome]:
        tool, cache = self.tool, self.guards.cache
        key = ""
        if cache is not None and first is None:
            key = cache_key(tool.name, args)
            hit, value = cache.get(key) if isinstance(cache, ResultCache) else await cache.get(key)
            if hit:
                observer.cache_hit(tool.name)
                if tool.streaming:
                    total = len(value)
                    for i, chunk in enumerate(value):
                        yield ToolResultChunk(call_id=call.call_id, index=i, total=total, data=chunk)
                yield Outcome(S.OK, data=value, cache_hit=True)
                return
        counter = ChunkCounter()
        outcome = Outcome(S.ERROR)
        async for item in guarded(
            tool,
            args,
            self.guards,
            run_id=run.run_id,
            call_id=call.call_id,
            counter=counter,
            observer=observer,
            remaining=run.remaining,
            sleep=sleep,
            first=first,
        ):
            if isinstance(item, Outcome):
                outcome = item
            else:
                yield item
        if self.fallback is not None:
            fallback, guards = self.fallback
            if usable(fallback.name, guards, outcome, run):
                async for item in fall_back(
                    fallback,
                    guards,
                    call=call,
                    run=run,
                    failed=outcome,
                    counter=counter,
                    observer=observer,
                    sleep=sleep,
                ):
                    if isinstance(item, Outcome):
                        outcome = item
                    else:
                        yield item
        if cache is not None and outcome.status is S.OK and not outcome.answered_by:
            if isinstance(cache, ResultCache):
                cache.put(key, outcome.data)
            else:
                await cache.put(key, outcome.data)
        yield outcome
