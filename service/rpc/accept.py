"""Taking up a burst of new calls sooner than grpc.aio does by itself.

grpc.aio's server keeps one request for a new call outstanding per registered method. When grpc's core matches it
with an arriving call, the completion travels through grpc's poller thread to the event loop, the server's one main
task wakes, starts the call's task, and only then asks the core for the next call. Under a burst (1,000 clients
connecting at once) new calls are taken up one per wake of that task, each wake behind everything else the loop has
to do, and they wait in the core meanwhile. Measured on the bare grpc.aio server (`bench/bare_grpc.py`), h2load with
C = 1000, one stream per connection, 2 CPUs: time to first byte mean 0.57-1.11 s and max 1.8-3.1 s with grpc's one
request, 0.21-0.29 s and 0.46-0.59 s with 64 more per method (docs/performance-log.md, "Taking up calls").

grpc has no option for this (neither a channel argument nor a parameter of `grpc.aio.server`), so `AcceptAhead`
keeps `extra` more requests outstanding per method, and hands each call it gets exactly as grpc's own loop hands
its one: the same method resolver, the same interceptors, the same scheduling with the watch for the client's
cancel. That uses grpc's private Cython API (`AioServer._request_registered_call`, `cygrpc._handle_rpc`,
`cygrpc._MethodResolver`, `cygrpc._schedule_rpc_coro`): grpcio is pinned to 1.85 in pyproject.toml for it, and
`available()` checks the signatures this module relies on, so that another grpcio serves as grpc made it, with a
warning, rather than failing. tests/test_accept.py fails if the pinned grpcio loses them. One thing grpc's loop does
that this one does not: count calls against `grpc.aio.server(maximum_concurrent_rpcs=...)`, which this service does
not set (its admission is its own, `service/policy/admit.py`).

Under load it also costs less than grpc's loop: that one waits with `asyncio.wait` on every method's request at
each wake, where each loop here awaits one request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import grpc
from grpc._cython import cygrpc

log = logging.getLogger(__name__)

# the arguments of grpc's private functions this module calls, as grpcio 1.85 names them
_SIGNATURES = {
    "_handle_rpc": ("method_name", "method_resolver", "interceptors", "rpc_state", "loop", "concurrency_exceeded"),
    "_schedule_rpc_coro": ("rpc_coro", "rpc_state", "loop", "method_name"),
}


def available() -> bool:
    """Whether this grpcio has the private pieces `AcceptAhead` uses, with the arguments it passes."""
    for name, args in _SIGNATURES.items():
        code = getattr(getattr(cygrpc, name, None), "__code__", None)
        if code is None or code.co_varnames[: code.co_argcount] != args:
            return False
    return hasattr(cygrpc, "_MethodResolver") and hasattr(cygrpc.AioServer, "_request_registered_call")


class AcceptAhead:
    """Stands in for the server where services are registered (grpc's `add_*_to_server` functions, or
    `interceptors.Registrar`), passing every registration on and keeping the registered handlers, so that `start`
    can keep `extra` more requests for new calls outstanding on each method of `services`."""

    def __init__(
        self, server: grpc.aio.Server, extra: int, services: Sequence[str], interceptors: Sequence[Any] = ()
    ) -> None:
        self.server = server
        self.extra = extra
        self.services = tuple(services)
        self.interceptors = tuple(interceptors)  # those grpc runs per call (tracing's), passed on as grpc would
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._calls: set[asyncio.Task[None]] = set()  # the event loop keeps only weak references to tasks
        self.taken = 0  # calls taken up by these requests rather than by grpc's own

    def add_generic_rpc_handlers(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self.server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        self.server.add_registered_method_handlers(service, handlers)
        if service in self.services:
            self.handlers.update({f"/{service}/{name}": handler for name, handler in handlers.items()})

    def start(self) -> None:
        """After the server started: `extra` request loops per method (none when `extra` is 0)."""
        if not self.extra or not self.handlers:
            return
        if not available():
            log.warning(
                "this grpcio lacks what accept_ahead uses: new calls are taken up one at a time per method",
                extra={"grpcio": grpc.__version__},
            )
            return
        resolver = cygrpc._MethodResolver([], dict(self.handlers))
        loop = asyncio.get_running_loop()
        for method in self.handlers:
            for _ in range(self.extra):
                self._loops.append(loop.create_task(self._take(method, resolver, loop), name=f"accept {method}"))

    async def stop(self) -> None:
        """Waits for the request loops to end, once the server has stopped: its core then fails every outstanding
        request, and each loop ends by itself. Nothing here cancels them: a request's state belongs to grpc's core
        until the core answers it, and cancelling the coroutine that holds it would free memory the core still
        writes to (seen as a crash in the garbage collector). While the server still runs this returns at once,
        and the loops end with the server's stop, as grpc's own request does."""
        if not self._loops or self.server._server.is_running():
            return
        loops, self._loops = self._loops, []
        _, pending = await asyncio.wait(loops, timeout=5.0)
        if pending:
            log.warning("requests for new calls outlived the server's stop", extra={"requests": len(pending)})

    @property
    def outstanding(self) -> int:
        return sum(not task.done() for task in self._loops)

    async def _take(self, method: str, resolver: Any, loop: asyncio.AbstractEventLoop) -> None:
        core = self.server._server  # grpc.aio.Server's cygrpc.AioServer
        name = method.encode()
        while core.is_running():
            try:
                state = await core._request_registered_call(name)
            except Exception:  # noqa: BLE001 - the core refuses requests once the server stops: this loop ends
                if core.is_running():
                    log.warning("a request for new calls failed; this one stops", extra={"method": method})
                return
            self.taken += 1
            call = cygrpc._handle_rpc(method, resolver, self.interceptors, state, loop, False)
            task = loop.create_task(cygrpc._schedule_rpc_coro(call, state, loop, method), name="rpc_task")
            self._calls.add(task)
            task.add_done_callback(self._calls.discard)
