"""How the fleet policies (`fleet.py`'s rate limiter, `fleet_breaker.py`'s breaker) send their requests to the shared
state: one batch out at a time per tool, and the requests that came while it was out together in the next, in the
order they came, so that one script run answers many callers in turn and one process never reorders its own.

Home-made on purpose. What it must keep is particular to these two: no linger (a batch is whatever queued while the
previous one was out, so a lone call waits for nothing but its round trip), one answer per request in the order
sent, a request that goes out even when its caller gives up (a reserved token is given back, a trial slot freed), and
failure as `StateUnavailable`, which sends the callers to the process's own policies. A general-purpose batcher
(flushing by size or after a linger, for independent items, often on threads) would add the linger and know nothing
of the rest, while all of this is a list and one asyncio task.

The fast path: `ask(..., here=True)` and `tell` send from the caller's own task when nothing is queued or out and
the last batch was a lone request (sparse traffic), sparing a task and two hops through the event loop. Under load,
requests come in waves (a batch's answers wake its callers together), and the first of a wave going alone would cost
the rest a round trip: there a task sends, as for any batch. The fast path keeps the order (what comes meanwhile
queues behind it) but not the going-out of a cancelled caller's request: the caller cancelled during that round trip
takes its request with it (made or not, its answer is lost), so only a request whose loss costs nothing to speak of
may take it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from service.policy.shared import StateUnavailable

log = logging.getLogger(__name__)

R = TypeVar("R")
A = TypeVar("A")


class Batcher(Generic[R, A]):
    """Sends requests through `send` (a batch in, its answers out in the same order, or `StateUnavailable`):
    `ask` waits for a request's answer, `tell` and `post` do not need it.

    `orphaned(answer)`: the answer of a caller that was cancelled while its request was out (give back what
    it was given). When a batch fails, its callers get `StateUnavailable`, and so do the queued requests that
    `fails_with` picks; a posted request (nobody waits for it) that fails goes to `dropped`. Tasks sending posted
    requests go into `senders` while they run, for a close to wait on."""

    def __init__(
        self,
        tool: str,
        part: str,
        send: Callable[[list[R]], Awaitable[list[A]]],
        *,
        orphaned: Callable[[A], Awaitable[None]] | None = None,
        fails_with: Callable[[R], bool] | None = None,
        dropped: Callable[[R, StateUnavailable], None] | None = None,
        senders: set[asyncio.Task[None]] | None = None,
    ) -> None:
        self.tool = tool
        self.part = part  # "rate limit", "circuit breaker": for the log and the error
        self.send = send
        self.orphaned = orphaned
        self.fails_with = fails_with
        self.dropped = dropped
        self.senders = senders
        self._queued: list[tuple[R, asyncio.Future[A] | None]] = []  # not sent yet, in the order they came
        self._sender: asyncio.Task[None] | None = None
        self._here = False  # a caller's own task has a request out
        self._lone = True  # the last batch was one request: sparse traffic, where the fast path pays
        self._idle: list[asyncio.Future[None]] = []  # `settle` waiting for that request's end

    async def ask(self, request: R, *, here: bool = False) -> A:
        """The request's answer. `here`: send it from this task when the fast path is open (see the module's
        docstring for when, and for what a caller cancelled meanwhile loses)."""
        if here and self._lone and self._sender is None and not self._here:
            return await self._send_here(request)
        answer: asyncio.Future[A] = asyncio.get_running_loop().create_future()
        self._queued.append((request, answer))
        self._start()
        return await answer

    async def tell(self, request: R) -> None:
        """Send a request whose answer its caller does not need: from this task when the fast path is open (the
        caller then waits for that round trip, which costs less than a task of its own), else posted."""
        if not self._lone or self._sender is not None or self._here:
            self.post(request)
            return
        try:
            await self._send_here(request)
        except StateUnavailable as exc:
            if self.dropped is not None:
                self.dropped(request, exc)

    def post(self, request: R) -> None:
        """Send the request, in its turn, without waiting for its answer."""
        self._queued.append((request, None))
        self._start()

    async def settle(self) -> None:
        """Until every request made so far has its answer."""
        while self._sender is not None or self._here:
            if self._sender is not None:
                await asyncio.shield(self._sender)
            else:
                idle: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._idle.append(idle)
                await idle

    async def _send_here(self, request: R) -> A:
        self._here = True
        try:
            (answer,) = await self.send([request])
        except StateUnavailable as exc:
            self._fail(self._failing_with(), exc)
            raise
        except Exception as exc:
            log.exception("%s of %s: asking the shared state failed", self.part, self.tool, extra={"tool": self.tool})
            raise self._stranded() from exc
        finally:
            self._here = False
            if self._queued:  # they came while this was out: their turn now
                self._start()
            for idle in self._idle:
                idle.set_result(None)
            self._idle.clear()
        return answer

    def _start(self) -> None:
        if self._sender is not None or self._here:
            return  # the one out takes the queue along when it is done
        sender = self._sender = asyncio.get_running_loop().create_task(self._drain())
        if self.senders is not None:
            self.senders.add(sender)
            sender.add_done_callback(self.senders.discard)

    async def _drain(self) -> None:
        """Send the queued requests, one batch at a time, until none are left. Whatever stops it, no caller is left
        waiting: an answer it cannot give is `StateUnavailable` (the caller goes on locally)."""
        batch: list[tuple[R, asyncio.Future[A] | None]] = []
        try:
            while self._queued:
                batch, self._queued = self._queued, []
                self._lone = len(batch) == 1
                try:
                    answers = await self.send([request for request, _ in batch])
                except StateUnavailable as exc:
                    self._fail([*batch, *self._failing_with()], exc)
                    batch = []
                    continue
                for (_, future), answer in zip(batch, answers, strict=True):
                    if future is None:
                        continue
                    if not future.done():
                        future.set_result(answer)
                    elif self.orphaned is not None:  # its caller was cancelled while the request was out
                        await self.orphaned(answer)
                batch = []
        except Exception:
            log.exception("%s of %s: asking the shared state failed", self.part, self.tool, extra={"tool": self.tool})
        finally:
            self._sender = None
            stranded, self._queued = [*batch, *self._queued], []
            self._fail(stranded, self._stranded())

    def _failing_with(self) -> list[tuple[R, asyncio.Future[A] | None]]:
        """The queued requests that fail with a batch that failed (taken out of the queue)."""
        if self.fails_with is None or not self._queued:
            return []
        failing = [queued for queued in self._queued if self.fails_with(queued[0])]
        self._queued = [queued for queued in self._queued if not self.fails_with(queued[0])]
        return failing

    def _fail(self, batch: list[tuple[R, asyncio.Future[A] | None]], exc: StateUnavailable) -> None:
        for request, future in batch:
            if future is None:
                if self.dropped is not None:
                    self.dropped(request, exc)
            elif not future.done():
                future.set_exception(exc)

    def _stranded(self) -> StateUnavailable:
        return StateUnavailable(f"the {self.part} of {self.tool} could not ask the shared state")
