"""Asyncio helpers the loop needs and the standard library lacks.

Cancellation contract: `merge` owns the tasks it starts. However the consumer stops (end of input, an exception,
`aclose()`, or cancellation of the consuming task), every producer task is cancelled and every source iterator
closed before `merge` returns. Waiting for them is bounded: a task that ignores its cancellation (it swallows
`CancelledError`, or is stuck in code that cannot be cancelled) is abandoned after `abandon_after_s` rather than
allowed to pin a run, or a shutdown, without limit. Abandoned means left running, logged, and referenced here until
it ends, so that the garbage collector cannot destroy it half-way; its end is logged too.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger(__name__)

ABANDON_AFTER_S = 0.5
"""How long a cancelled task gets to end before it is abandoned: ample for cleanup that closes a connection or a
file, and short enough that `CancelRun` (which waits a second for the final state) and a drain are not held up."""

_DONE = object()
_abandoned: set[asyncio.Task[Any]] = set()  # the event loop itself keeps only weak references to tasks


class _Failed:
    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def abandoned() -> frozenset[asyncio.Task[Any]]:
    """The abandoned tasks still running."""
    return frozenset(_abandoned)


async def cancel_and_wait(
    tasks: Collection[asyncio.Task[Any]],
    within: float,
    *,
    fields: Mapping[str, Any] | None = None,
    on_abandon: Callable[[], object] | None = None,
) -> None:
    """Cancel `tasks` and wait up to `within` seconds for them to end. Each one still running then is abandoned,
    logged as a warning with `fields` and counted through `on_abandon`; so are those still running when this wait
    is itself cancelled, as nobody waits for them then either."""
    for task in tasks:
        task.cancel()
    pending = [task for task in tasks if not task.done()]
    try:
        if pending:
            await asyncio.wait(pending, timeout=within)
    finally:
        left = [task for task in tasks if not task.done()]
        for task in left:
            _abandon(task, within, fields or {})
            if on_abandon is not None:
                on_abandon()
        for task in tasks:
            if task.done() and not task.cancelled():
                task.exception()  # retrieved, as gather() did: no "exception was never retrieved" at collection


def _abandon(task: asyncio.Task[Any], within: float, fields: Mapping[str, Any]) -> None:
    _abandoned.add(task)
    since = time.monotonic()
    log.warning(
        "task %s did not stop within %g s of being cancelled; abandoned, still running",
        task.get_name(),
        within,
        extra={"task": task.get_name(), **fields},
    )

    def ended(task: asyncio.Task[Any]) -> None:
        _abandoned.discard(task)
        error = None if task.cancelled() else task.exception()
        log.info(
            "abandoned task %s ended",
            task.get_name(),
            extra={
                "task": task.get_name(),
                "after_s": round(time.monotonic() - since, 3),
                "outcome": "cancelled" if task.cancelled() else repr(error) if error else "returned",
                **fields,
            },
        )

    task.add_done_callback(ended)


async def merge(
    *sources: AsyncIterator[T],
    buffer: int = 64,
    abandon_after_s: float | Callable[[], float] = ABANDON_AFTER_S,
    name: str | None = None,
    fields: Mapping[str, Any] | None = None,
    on_abandon: Callable[[], object] | None = None,
) -> AsyncGenerator[T, None]:
    """Yield items from all `sources` as they arrive; an exception from any source is raised to the consumer.
    `name` (of the tasks reading the sources) and `fields` say what was abandoned, when a source has to be (see
    `cancel_and_wait`); `abandon_after_s` may be asked when the sources are cancelled (a callable).

    Written here rather than taken from `aiostream` because the loop's cancellation guarantees hinge on exactly
    this behaviour and it is short.
    """
    queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=buffer)

    async def pump(source: AsyncIterator[T]) -> None:
        try:
            try:
                async for item in source:
                    await queue.put(item)
            finally:
                aclose = getattr(source, "aclose", None)  # any async iterator will do; not all can be closed
                if aclose is not None:
                    await aclose()
        except Exception as exc:
            await queue.put(_Failed(exc))
        else:
            await queue.put(_DONE)

    tasks = [asyncio.create_task(pump(s), name=name) for s in sources]
    item: Any = None
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
        item = None  # a source's exception, raised here, has this frame in its traceback: no cycle through it
        within = abandon_after_s() if callable(abandon_after_s) else abandon_after_s
        await cancel_and_wait(tasks, within, fields=fields, on_abandon=on_abandon)


class Slots:
    """A semaphore that can be overdrawn: `acquire` waits, first come first served, while `taken` is at `capacity`;
    `take` counts a holder at once, past the capacity if need be; `release` gives one back and lets the next waiter
    in while below it. asyncio.Semaphore cannot be overdrawn: a background run continued after a restart goes on at
    once (its callers follow it) yet must count, or runs never started fill the slots beside it (an outside finding:
    4 background runs ran at once under a cap of 2 after a restart, 12 under 8)."""

    __slots__ = ("capacity", "taken", "_waiters")

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.taken = 0
        self._waiters: list[asyncio.Future[None]] = []

    async def acquire(self) -> None:
        if self.taken < self.capacity and not self._waiters:
            self.taken += 1
            return
        granted = asyncio.get_running_loop().create_future()
        self._waiters.append(granted)
        try:
            await granted
        except asyncio.CancelledError:
            if granted.done() and not granted.cancelled():
                self.release()  # let in, then cancelled before it went on: the slot goes to the next
            else:
                self._waiters.remove(granted)
            raise

    def take(self) -> None:
        self.taken += 1

    def release(self) -> None:
        self.taken -= 1
        while self._waiters and self.taken < self.capacity:
            self.taken += 1
            self._waiters.pop(0).set_result(None)
