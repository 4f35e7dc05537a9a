"""A run's scope (`RunControl.scope`): its deadline and `stop_now` end the body with TimeoutError, as
`asyncio.timeout_at` would; a TimeoutError of the body's own and a cancel from outside pass through unchanged."""

from __future__ import annotations

import asyncio

import pytest

from service.control import RunControl
from service.errors import RunCancelled


async def forever() -> None:
    await asyncio.get_running_loop().create_future()


async def test_a_passed_deadline_ends_the_body_with_timeout_error() -> None:
    control = RunControl(deadline=asyncio.get_running_loop().time() - 1)
    scope = control.scope()
    with pytest.raises(TimeoutError):
        async with scope:
            await forever()
    assert scope.fired
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_stop_now_fires_the_scope_early_during_the_body_or_before_it() -> None:
    control = RunControl(deadline=asyncio.get_running_loop().time() + 3600)
    scope = control.scope()
    asyncio.get_running_loop().call_soon(control.stop_now, RunCancelled("stop"))
    with pytest.raises(TimeoutError):
        async with scope:
            await forever()
    assert scope.fired and control.stop_reason().message == "stop"
    stopped = RunControl()  # no deadline, stopped before the scope is entered
    stopped.stop_now(RunCancelled("early"))
    early = stopped.scope()
    with pytest.raises(TimeoutError):
        async with early:
            await forever()
    assert early.fired


async def test_a_body_that_ends_in_time_leaves_no_timer_and_no_cancel() -> None:
    loop = asyncio.get_running_loop()
    control = RunControl(deadline=loop.time() + 3600)
    scope = control.scope()
    async with scope:
        await asyncio.sleep(0)
    assert not scope.fired
    assert not [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    control.stop_now(RunCancelled("after"))  # after the scope: nothing to fire
    await asyncio.sleep(0)
    assert asyncio.current_task().cancelling() == 0  # type: ignore[union-attr]


async def test_the_bodys_own_timeout_error_passes_through_unfired() -> None:
    scope = RunControl(deadline=asyncio.get_running_loop().time() + 3600).scope()
    with pytest.raises(TimeoutError, match="a socket's own"):
        async with scope:
            raise TimeoutError("a socket's own")
    assert not scope.fired


async def test_a_cancel_from_outside_stays_a_cancel_with_or_without_the_deadline() -> None:
    for deadline_passed in (False, True):
        entered = asyncio.Event()
        scope = None

        async def body(passed: bool = deadline_passed, entered: asyncio.Event = entered) -> None:
            nonlocal scope
            loop = asyncio.get_running_loop()
            scope = RunControl(deadline=loop.time() + (-1 if passed else 3600)).scope()
            async with scope:
                entered.set()
                await forever()

        task = asyncio.create_task(body())
        await entered.wait()
        task.cancel()  # the caller's cancel, in the same turn as the deadline's when it has passed
        with pytest.raises(asyncio.CancelledError):
            await task
        assert scope is not None and scope.fired is deadline_passed
