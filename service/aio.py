"""Asyncio helpers the loop needs and the standard library lacks.

Cancellation contract: `merge` owns the tasks it starts. However the consumer stops (end of input, an exception,
`aclose()`, or cancellation of the consuming task), every producer task is cancelled and awaited before `merge`
returns, and every source iterator is closed, so nothing is left running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

T = TypeVar("T")

_DONE = object()


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


async def merge(*sources: AsyncIterator[T], buffer: int = 64) -> AsyncIterator[T]:
    """Yield items from all `sources` as they arrive; an exception from any source is raised to the consumer.

    Written here rather than taken from `aiostream` because the loop's cancellation guarantees hinge on exactly
    this behaviour and it is twenty lines.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer)

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            async with aclosing(source):  # type: ignore[type-var]
                async for item in source:
                    await queue.put(item)
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(s)) for s in sources]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is _DONE:
                remaining -= 1
            elif isinstance(item, _Failed):
                raise item.exc
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
