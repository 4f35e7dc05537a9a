"""A tool's policy stages after admission, composed once per tool:

    cache     an idempotent tool's result for the same input, within its TTL      → ok, cache_hit
    guarded   rate limit, then attempts under breaker and timeout, with retries   (`guarded.py`)
    fallback  on final failure or open circuit, the same input to another tool     (`fallback.py`)

`Pipeline.run` yields the call's events, then one `Outcome`. The stage objects are built once per executor; a call
allocates only what it must (its chunk counter and outcomes), never a closure or a generator per stage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from service.events import Event, ToolResultChunk
from service.events import ToolStatus as S
from service.policy.attempt import ChunkCounter, Outcome
from service.policy.cache import ResultCache, cache_key
from service.policy.call import RunContext, ToolCallRequest
from service.policy.fallback import fall_back, usable
from service.policy.guarded import guarded
from service.policy.guards import Guards
from service.policy.observer import CallObserver
from tools.base import Tool


class Pipeline:
    """One tool's stages: its guards, and its fallback's tool and guards when its policy names one."""

    __slots__ = ("fallback", "guards", "tool")

    def __init__(self, tool: Tool[Any], guards: Guards, fallback: tuple[Tool[Any], Guards] | None = None) -> None:
        self.tool = tool
        self.guards = guards
        self.fallback = fallback

    async def run(
        self,
        call: ToolCallRequest,
        run: RunContext,
        args: Any,
        observer: CallObserver,
        sleep: Callable[[float], Awaitable[None]],
    ) -> AsyncIterator[Event | Outcome]:
        tool, cache = self.tool, self.guards.cache
        key = ""
        if cache is not None:
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
