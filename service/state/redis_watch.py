"""One blocking reader for every run stream this process follows: the mirrors of runs driven elsewhere, and the
waits for a run's first shipment. A blocking XREAD holds its connection for as long as it waits, so one per watched
run would take a connection per run; this one XREADs all the followed streams at once on a single connection.

A stream added while that XREAD waits must join it: the reader is woken with CLIENT UNBLOCK from another connection
(Redis's own way to end a blocked command early; the XREAD then returns as if it timed out) and reads again with
the new stream in the set, its history first (XREAD from `0-<n>` returns at once what is there). No polling.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from service.state.redis_layout import stream_entries_by_key

if TYPE_CHECKING:
    import redis.asyncio as redis

log = logging.getLogger(__name__)

Entries = list[tuple[bytes, dict[bytes, bytes]]]
READ_COUNT = 1000  # entries of one stream an XREAD returns at most (an entry carries a shipment's events)


class Follow:
    """A stream followed: `deliver(entries)` gets its new entries in order; `last` is the id read up to."""

    def __init__(self, key: str, last: int, deliver: Callable[[Entries], None], now: float) -> None:
        self.key = key
        self.last = last
        self.deliver = deliver
        self.heard = now  # when it last had entries (or was checked): see `quiet`


class StreamReader:
    def __init__(
        self,
        client: redis.Redis,
        blocking: redis.Redis,
        *,
        block_s: float,
        retry_s: float,
        failed: Callable[[str, BaseException], None],
        quiet: Callable[[list[Follow]], Awaitable[None]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`client` for the wake-ups (CLIENT UNBLOCK); the reads take one connection of `blocking`'s pool (whose
        read timeout outlasts `block_s`) for their own.
        `quiet(follows)` is called with the streams that had nothing for `block_s` (their drivers may be dead)."""
        self.client = client
        self.blocking = blocking
        self.block_s = block_s
        self.retry_s = retry_s
        self._failed = failed
        self._quiet = quiet
        self._clock = clock
        self.follows: dict[str, Follow] = {}
        self._conn: redis.Redis | None = None
        self._conn_id: int | None = None
        self._reading = False  # an XREAD is in flight
        self._generation = 0  # counts the XREADs: a wake-up is for one of them
        self._woken = -1
        self._changed = asyncio.Event()
        self._wakes: set[asyncio.Task[None]] = set()

    def follow(self, key: str, after: int, deliver: Callable[[Entries], None]) -> Follow:
        """Follow `key` from the entry after id `0-<after>`; the reader is woken to add it at once."""
        follow = self.follows[key] = Follow(key, after, deliver, self._clock())
        self._changed.set()
        if self._reading and self._woken != self._generation:
            self._woken = self._generation
            task = asyncio.get_running_loop().create_task(self._wake(self._generation), name="stream reader wake-up")
            self._wakes.add(task)
            task.add_done_callback(self._wakes.discard)
        return follow

    def stop(self, key: str) -> None:
        self.follows.pop(key, None)  # left in the XREAD in flight: what it returns for the key is dropped

    async def appeared(self, key: str, within_s: float) -> bool:
        """Whether stream `key` has an entry, or gets one within `within_s` (a run's first shipment)."""
        if key in self.follows:
            return True  # mirrored already, so recorded
        found: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        def deliver(entries: Entries) -> None:
            if not found.done():
                found.set_result(True)

        self.follow(key, 0, deliver)
        try:
            async with asyncio.timeout(within_s):
                return bool(await found)
        except TimeoutError:
            return False
        finally:
            if self.follows.get(key) is not None and self.follows[key].deliver is deliver:
                self.stop(key)

    async def _wake(self, generation: int) -> None:
        """End the XREAD `generation` so the next one includes the new streams. CLIENT UNBLOCK can reach Redis before
        the XREAD does (sent on another connection): then it unblocks nothing and is sent again. A read on a
        connection made anew inside the XREAD call (a retried command) has no known id: that stream joins when the
        read times out, `block_s` at most."""
        while self._reading and self._generation == generation and self._conn_id is not None:
            try:
                if await self.client.client_unblock(self._conn_id):
                    return
            except (RedisError, OSError) as exc:
                self._failed("watch", exc)
                return
            await asyncio.sleep(0.001)

    async def run_forever(self) -> None:
        while True:
            if not self.follows:
                self._changed.clear()
                await self._changed.wait()
            try:
                sent, answer = await self._read()
            except (RedisError, OSError) as exc:
                self._conn_id = None
                self._failed("watch", exc)
                await asyncio.sleep(self.retry_s)
                continue
            now = self._clock()
            for key, entries in stream_entries_by_key(answer):
                name = key.decode()
                follow = self.follows.get(name)
                if follow is None or not entries or sent.get(name) != f"0-{follow.last}":
                    continue  # stopped (or followed anew) while the read was in flight
                follow.last = int(entries[-1][0].split(b"-")[1])
                follow.heard = now
                follow.deliver(entries)
            quiet = [f for f in self.follows.values() if now - f.heard >= self.block_s]
            if quiet:
                for follow in quiet:
                    follow.heard = now
                await self._quiet(quiet)

    async def _read(self) -> tuple[dict[str, str], Any]:
        """One XREAD of every followed stream: the ids it read from, and its answer."""
        if self._conn is None:
            self._conn = await self.blocking.client().initialize()
            assert self._conn.connection is not None
            self._conn.connection.register_connect_callback(self._reconnected)  # type: ignore[no-untyped-call]
        if self._conn_id is None:
            self._conn_id = await self._conn.client_id()
        streams = {f.key: f"0-{f.last}" for f in self.follows.values()}
        self._changed.clear()
        self._generation += 1
        self._reading = True
        try:
            read = await self._conn.xread(streams, count=READ_COUNT, block=max(1, int(self.block_s * 1000)))  # type: ignore[arg-type]
        finally:
            self._reading = False
        return streams, read

    def _reconnected(self, connection: Any) -> None:
        # a new connection has a new client id: asked again before the next read
        self._conn_id = None

    async def close(self) -> None:
        for task in list(self._wakes):
            task.cancel()
        if self._conn is not None:
            await self._conn.aclose()
