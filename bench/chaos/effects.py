"""The side effects the harness counts: a loopback HTTP server that `http_request` calls, recording every request by
its `Idempotency-Key` (the call's `run_id:call_id`). It holds each request for `hold_s` before answering, so that a
kill lands while calls are in flight, and notes a request whose caller went away before the answer (interrupted).

A GET is safe to repeat (`http_request` declares it `side_effects: none`); a POST is not (`unsafe`): the harness checks
that a POST's key is executed at most once, and that an interrupted one is reported `OUTCOME_UNKNOWN`.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from dataclasses import dataclass, field

from aiohttp import web


@dataclass
class Effect:
    """Every execution of one call (one idempotency key)."""

    kind: str  # "safe" or "unsafe", from the path
    executions: int = 0
    interrupted: int = 0  # executions whose caller was gone before the answer was written
    paths: set[str] = field(default_factory=set)


class Effects:
    def __init__(self, hold_s: float = 0.3) -> None:
        self.hold_s = hold_s
        self.by_key: dict[str, Effect] = {}
        self.without_key = 0  # requests that carried no Idempotency-Key: a violation of the tools' contract
        self.per_kind: dict[str, int] = defaultdict(int)
        # unsafe calls being held right now: key -> the caller's port, so that the harness can kill that very caller
        self.unsafe_in_flight: dict[str, int] = {}
        self.unsafe_arrived = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> str:
        app = web.Application()
        app.router.add_route("*", "/{label}/{turn}/{kind}", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        key = request.headers.get("Idempotency-Key")
        self.per_kind[kind] += 1
        if key is None:
            self.without_key += 1
            return web.json_response({"error": "no Idempotency-Key"}, status=400)
        effect = self.by_key.setdefault(key, Effect(kind))
        effect.executions += 1  # the side effect happens on arrival, as an upstream's write would
        effect.paths.add(request.path)
        if kind == "unsafe" and request.transport is not None:
            self.unsafe_in_flight[key] = request.transport.get_extra_info("peername")[1]
            self.unsafe_arrived.set()
        try:
            await asyncio.sleep(self.hold_s)
        except asyncio.CancelledError:  # aiohttp cancels the handler of a lost connection when so configured
            effect.interrupted += 1
            raise
        finally:
            self.unsafe_in_flight.pop(key, None)
        if request.transport is None or request.transport.is_closing():
            effect.interrupted += 1
        return web.json_response({"key": key, "kind": kind, "execution": effect.executions})
