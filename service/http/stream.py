"""A run as a Server-Sent Events response: its log from a seq on, live, one event per delivery, a comment when the
stream has been quiet for `heartbeat_s`, and the end of the body when the run ends.

A plain ASGI response rather than Starlette's StreamingResponse: that one runs each body in an anyio task group
with a second task listening for the disconnect, and has no place for a heartbeat. Here one helper task does both:
it waits for the disconnect with the heartbeat as its timeout. The caller leaving cancels the stream's task, which
stops a run the stream owns (`AgentApi.streaming`), and is then swallowed: the client is gone, nothing is wrong.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from service.api import AgentApi
from service.errors import AgentError, SubscriberTooSlow
from service.http.sse import HEARTBEAT, comment, frame
from service.http.status import error_of
from service.run import Run
from service.sent import SENT

log = logging.getLogger(__name__)

JSON = b"application/json"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on as it comes
]


class EventStream(Response):
    """A Starlette `Response` in name only (routes return one): it answers by `__call__` alone."""

    _send: Send  # the ASGI send of the response, set when it starts

    def __init__(
        self,
        api: AgentApi,
        run: Run,
        after_seq: int,
        *,
        owner: bool,
        heartbeat_s: float,
        timeout_s: float | None = None,
    ) -> None:
        """`owner`: the stream started the run and the run ends if it does; `timeout_s`: the stream ends after
        this (the request's timeout), the run not."""
        self.status_code = 200  # what the route's metrics read
        self.background = None
        self.api = api
        self.run = run
        self.after_seq = after_seq
        self.owner = owner
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.sent = 0
        self.gone = False
        self.started = False  # the headers are sent
        self.ended = False  # the last of the body is sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._send = send
        watcher = asyncio.get_running_loop().create_task(self._watch(receive, task))
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._events()
            await self._body(b"", more=False)
        except TimeoutError:  # the request's own timeout: end the body; a reconnect resumes
            await self._body(comment("request timeout"), more=False)
        except AgentError as exc:  # the stream cannot go on (its run's replica died): said, not cut off
            await self._refused(exc)
        except asyncio.CancelledError:
            if not self.gone or task.uncancel() > 0:
                raise  # not (only) the caller leaving: the server is stopping
        finally:
            watcher.cancel()

    async def _body(self, body: bytes, *, more: bool = True) -> None:
        """Send `body`; the headers go with the first one, so that (as over gRPC) the first byte is the first event
        (or heartbeat), and a client's time to first byte measures the run, not the handshake."""
        if self.ended:  # a heartbeat racing the end of the body
            return
        self.ended = not more
        if not self.started:
            self.started = True
            headers = [*HEADERS, (b"x-run-id", self.run.id.encode())]
            await self._send({"type": "http.response.start", "status": 200, "headers": headers})
        await self._send({"type": "http.response.body", "body": body, "more_body": more})

    async def _refused(self, exc: AgentError) -> None:
        """Before any byte, the error's status and JSON body, as any route answers; after, a comment saying why
        (the status is 200 by then) and the end of the body, so that the client sees an end and not a cut."""
        log.warning("event stream ended early", extra={"run_id": self.run.id, "code": exc.code, "error": exc.message})
        if self.started:
            await self._body(comment(f"{exc.code}: {exc.message}"), more=False)
            return
        self.started = self.ended = True
        self.status_code, body = error_of(exc.with_traceback(None))
        await self._send(
            {"type": "http.response.start", "status": self.status_code, "headers": [(b"content-type", JSON)]}
        )
        await self._send({"type": "http.response.body", "body": body, "more_body": False})

    async def _events(self) -> None:
        run = self.run
        runs = self.api.config.runs
        try:
            with self.api.streaming(run, owner=self.owner):
                async for entry in run.follow(
                    self.after_seq, coalesce_lag=runs.subscriber_coalesce_lag, max_lag=runs.subscriber_max_lag
                ):
                    SENT[type(entry.event)] += 1  # counted as the gRPC stream counts (service/sent.py)
                    self.sent += 1
                    await self._body(frame(entry, run.id))
        except SubscriberTooSlow as exc:
            # the client is told in a comment and resumes with Last-Event-ID (EventSource reconnects by itself)
            log.warning("slow subscriber dropped", extra={"run_id": run.id, "last_seq": exc.last_seq})
            await self._body(comment(exc.message))

    async def _watch(self, receive: Receive, stream: asyncio.Task[Any]) -> None:
        """Until the caller leaves (then cancel the stream), a heartbeat each `heartbeat_s` nothing was sent in."""
        seen = self.sent
        while True:
            try:
                async with asyncio.timeout(self.heartbeat_s):
                    message = await receive()
            except TimeoutError:
                if self.sent == seen:
                    await self._body(HEARTBEAT)
                seen = self.sent
                continue
            if message["type"] == "http.disconnect":
                self.gone = True
                stream.cancel()
                return
