"""A run's scope (`RunControl.scope()`): it ends its body at the run's deadline, as `asyncio.timeout_at` would, or at
once on `stop_now`; the deadlines of all runs wait on one timer, whatever order they come in and however many runs
end before theirs."""

from __future__ import annotations

import asyncio

import pytest

from service.control import RunControl, _Deadlines
from service.errors import RunCancelled


async def waited_out(control: RunControl, body_s: float) -> tuple[bool, float]:
    """Whether the scope ended a body of `body_s` with TimeoutError, and when on the loop's clock."""
    loop = asyncio.get_running_loop()
    scope = control.scope()
    try:
        async with scope:
            await asyncio.sleep(body_s)
    except TimeoutError:
        assert scope.fired
        return True, loop.time()
    assert not scope.fired
    return False, loop.time()


async def test_deadlines_set_out_of_order_each_end_their_own_run_at_their_time() -> None:
    now = asyncio.get_running_loop().time()
    offsets = [0.30, 0.10, 0.20, 0.05]  # the later a run starts here, the sooner its deadline, mostly
    results = await asyncio.gather(*(waited_out(RunControl(deadline=now + s), 5) for s in offsets))
    for offset, (timed_out, at) in zip(offsets, results, strict=True):
        assert timed_out
        assert now + offset <= at < now + offset + 0.5


async def test_runs_that_end_first_do_not_hold_up_a_later_deadline() -> None:
    now = asyncio.get_running_loop().time()
    # more early ends than the sweep waits for, with deadlines before and after the one that fires; the quick runs'
    # deadlines leave 0.2 s for the 201 tasks' first step (0.05 s once failed on a machine busy installing packages)
    quick = [waited_out(RunControl(deadline=now + 0.2 + i / 1000), 0) for i in range(200)]
    late = waited_out(RunControl(deadline=now + 0.3), 5)
    results = await asyncio.gather(late, *quick)
    assert results[0][0] and now + 0.3 <= results[0][1] < now + 0.8
    assert not any(timed_out for timed_out, _ in results[1:])
    deadlines = _Deadlines.of(asyncio.get_running_loop())
    assert len(deadlines.heap) <= 2 * 64  # the entries of ended runs were swept out, not kept


async def test_a_stop_ends_the_body_at_once_and_a_timeout_of_its_own_passes_through() -> None:
    loop = asyncio.get_running_loop()
    control = RunControl(deadline=loop.time() + 60)
    started = loop.time()
    stopping = waited_out(control, 5)
    task = asyncio.ensure_future(stopping)
    await asyncio.sleep(0.01)
    control.stop_now(RunCancelled("cancelled by CancelRun"))
    timed_out, at = await task
    assert timed_out and at - started < 1
    assert control.stop_reason().code == "CANCELLED"

    mine = RunControl(deadline=loop.time() + 60).scope()
    with pytest.raises(TimeoutError):
        async with mine:
            raise TimeoutError("a socket's")
    assert not mine.fired


async def test_a_control_that_holds_its_loop_never_asks_asyncio_for_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """A run's control holds its event loop (the registry gives it): its scope, deadline and stop do not call
    `asyncio.get_running_loop()`, a getpid() system call each on Python 3.11."""
    loop = asyncio.get_running_loop()
    controls = [RunControl(deadline=loop.time() + 0.05, loop=loop), RunControl(deadline=loop.time() + 60, loop=loop)]

    def asked() -> asyncio.AbstractEventLoop:
        raise AssertionError("asked asyncio for the running loop")

    async def scoped(control: RunControl) -> bool:
        scope = control.scope()
        try:
            async with scope:
                await asyncio.sleep(5)
        except TimeoutError:
            return scope.fired
        return False

    monkeypatch.setattr(asyncio, "get_running_loop", asked)
    assert 0 < controls[0].remaining() <= 0.05  # type: ignore[operator]
    stopping = asyncio.ensure_future(scoped(controls[1]))
    await asyncio.sleep(0)
    controls[1].stop_now(RunCancelled("cancelled by CancelRun"))
    assert await asyncio.gather(scoped(controls[0]), stopping) == [True, True]  # the deadline's, then the stop's
