"""The HTTP face's routes (docs/http.md): each identifies the caller, reads its request as protobuf JSON and calls the
application layer (`service/api.py`) the gRPC servicer calls; an AgentError becomes the JSON error `status.py`
maps. Runs stream as Server-Sent Events (`stream.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message
from opentelemetry import propagate, trace
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route, Router
from starlette.types import ASGIApp, Receive, Scope, Send

from agent.v1 import agent_pb2 as pb
from service import telemetry
from service.api import AgentApi
from service.callers import Caller, bind_caller
from service.config import Config
from service.errors import AgentError, DeadlineExceeded, InvalidRequest, RequestTooLarge
from service.http import viewer
from service.http.sse import message_json
from service.http.status import error_body, error_of
from service.http.stream import EventStream
from service.rpc.auth import Authenticator
from service.rpc.convert import list_runs_response, run_state, run_to_proto

log = logging.getLogger(__name__)

PEER_NAMES = "peer_names"  # the connection's client-certificate identities, in the request's state (server.py)
TIMEOUT_HEADERS = ("request-timeout", "x-request-timeout")  # seconds; the HTTP face's grpc-timeout
JSON = "application/json"

Handler = Callable[[Request, Caller, float | None], Awaitable[Response]]


class HttpFace:
    """The routes, bound to the application layer and the authenticator the composition root built."""

    def __init__(self, api: AgentApi, authenticator: Authenticator, config: Config) -> None:
        self.api = api
        self.authenticator = authenticator
        self.config = config

    def app(self) -> ASGIApp:
        """The routes as an ASGI app: a bare Starlette `Router`, since every route maps its own errors and
        `Starlette`'s two default middlewares wrap each send of every stream (a measurable share of an event's
        cost); uvicorn answers an exception that escapes anyway with a 500. CORS only when origins are listed."""
        table: list[tuple[str, str, Handler]] = [
            ("POST", "/v1/runs:stream", self.run_stream),
            ("POST", "/v1/runs", self.submit),
            ("GET", "/v1/runs", self.list_runs),
            ("GET", "/v1/runs/{run_id}/events", self.events),
            ("POST", "/v1/runs/{run_id}:cancel", self.cancel),
            ("GET", "/v1/runs/{run_id}", self.get_run),
            ("GET", "/v1/tools", self.list_tools),
        ]
        by_path: dict[str, dict[str, Callable[[Request], Awaitable[Response]]]] = {}
        for method, path, handler in table:
            by_path.setdefault(path, {})[method] = self._route(path, handler)
        # one route a path, every method: a method the path lacks is answered here (405, JSON), and a path with
        # a suffix (`/v1/runs/{run_id}:cancel`) is not taken for another's parameter (`GET …:cancel` as a run id)
        routes = [Route(path, _ByMethod(handlers)) for path, handlers in by_path.items()]
        # the run viewer's page (docs/viewer.md): public, it calls the routes above
        router = Router(routes=[*routes, *viewer.routes()], default=_not_found)
        if not self.config.http.cors_origins:  # no CORS headers at all unless origins are listed
            return router
        return CORSMiddleware(
            router,
            allow_origins=self.config.http.cors_origins,
            allow_methods=["GET", "POST"],
            allow_headers=["authorization", "content-type", "last-event-id", "traceparent", *TIMEOUT_HEADERS],
            expose_headers=["x-run-id"],  # a page on another origin reads the stream's run id from it
        )

    def _route(self, route: str, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """`handler` behind the face's common steps: deadline, caller, trace span, error mapping and metrics."""
        requests = telemetry.HTTP_REQUESTS

        async def serve(request: Request) -> Response:
            try:
                remaining = _timeout(request)
                caller = self.identify(request)
                with _span(request, route):
                    response = await handler(request, caller, remaining)
            except AgentError as exc:
                status, body = error_of(exc.with_traceback(None))
                response = Response(body, status, media_type=JSON)
            except Exception:  # a bug of ours: logged, answered as the gRPC face answers one (INTERNAL)
                log.exception("http request failed", extra={"route": route})
                response = Response(error_body("INTERNAL", "internal error", "INTERNAL"), 500, media_type=JSON)
            telemetry.child(requests, route, str(response.status_code)).inc()
            return response

        return serve

    def identify(self, request: Request) -> Caller:
        names = request.scope.get("state", {}).get(PEER_NAMES, ())
        metadata = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.scope["headers"]]
        caller = self.authenticator.identify_by(names, metadata)
        bind_caller(caller)  # for what the run reads of its caller, as under the gRPC face
        return caller

    async def run_stream(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        message = _parse(await self._body(request), pb.RunAgentRequest())
        run, created = await self.api.start(message, caller, remaining_s=remaining, background=False)
        owner = created and message.on_disconnect != pb.RunAgentRequest.CONTINUE
        return EventStream(self.api, run, 0, owner=owner, heartbeat_s=self.config.http.heartbeat_s)

    async def events(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        after = request.headers.get("last-event-id") or request.query_params.get("after_seq") or "0"
        try:
            after_seq = int(after)
        except ValueError:
            raise InvalidRequest(f"Last-Event-ID or after_seq must be a seq (an integer), got {after!r}") from None
        run, after_seq = await self.api.watch(request.path_params["run_id"], caller, after_seq)
        return EventStream(
            self.api, run, after_seq, owner=False, heartbeat_s=self.config.http.heartbeat_s, timeout_s=remaining
        )

    async def submit(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        message = _parse(await self._body(request), pb.RunAgentRequest())
        async with _deadline(remaining):
            run, _ = await self.api.start(message, caller, remaining_s=None, background=True)
        return _json(pb.SubmitRunResponse(run_id=run.id, state=run_state(run.state)))

    async def get_run(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        async with _deadline(remaining):
            return _json(run_to_proto(await self.api.record(request.path_params["run_id"], caller)))

    async def list_runs(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        """`?state=RUNNING&state=QUEUED&page_size=&page_token=&caller=`: ListRuns' fields as query parameters."""
        params = request.query_params
        message = pb.ListRunsRequest(caller=params.get("caller", ""), page_token=params.get("page_token", ""))
        try:
            message.states.extend(pb.Run.State.Value(s.upper()) for s in params.getlist("state") if s)
            message.page_size = int(params.get("page_size") or 0)
        except ValueError:
            raise InvalidRequest(
                f"bad query {str(params)[:200]!r}: state is one of QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED "
                "(repeatable); page_size a whole number, 1-500"
            ) from None
        async with _deadline(remaining):
            return _json(list_runs_response(*await self.api.list_runs(message, caller)))

    async def cancel(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        body = await self._body(request)
        mode = _parse(body, pb.CancelRunRequest()).mode if body.strip() else pb.CancelRunRequest.IMMEDIATE
        async with _deadline(remaining):
            run_id, state = await self.api.cancel(request.path_params["run_id"], caller, mode)
        return _json(pb.CancelRunResponse(run_id=run_id, state=run_state(state)))

    async def list_tools(self, request: Request, caller: Caller, remaining: float | None) -> Response:
        return _json(pb.ListToolsResponse(tools=self.api.list_tools(caller)))

    async def _body(self, request: Request) -> bytes:
        """The body, refused past the gRPC face's receive limit before more of it is read."""
        limit = self.config.limits.max_receive_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"the body is larger than {limit} bytes (limits.max_receive_bytes)")
            chunks.append(chunk)
        return b"".join(chunks)


class _ByMethod:
    """A path's handler for each method it has (HEAD as GET); any other method is refused as the routes refuse.
    An ASGI app, not an endpoint function: Starlette would give a function route GET alone and answer every other
    method itself, in plain text."""

    def __init__(self, handlers: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.handlers = {**handlers, "HEAD": handlers["GET"]} if "GET" in handlers else handlers
        self.allow = ", ".join(sorted(self.handlers))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive, send)
        handler = self.handlers.get(request.method)
        if handler is None:
            body = error_body(
                "UNIMPLEMENTED", f"{request.url.path} takes {self.allow}, not {request.method[:20]}", "WRONG_METHOD"
            )
            response = Response(body, 405, media_type=JSON, headers={"Allow": self.allow})
        else:
            response = await handler(request)
        await response(scope, receive, send)


async def _not_found(scope: Scope, receive: Receive, send: Send) -> None:
    """A path no route has: the routes' JSON error rather than Starlette's plain text."""
    path = scope.get("path", "")
    body = error_body("NOT_FOUND", f"no such path: {path[:200]} (the routes: docs/http.md)", "NO_SUCH_PATH")
    await Response(body, 404, media_type=JSON)(scope, receive, send)


def _parse(body: bytes, message: Any) -> Any:
    name = message.DESCRIPTOR.name
    try:
        text = body.decode("utf-8-sig") if body else "{}"  # a BOM (PowerShell sends one) is no part of the JSON
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"the body is not UTF-8 (JSON is): {exc}") from None
    if not text.lstrip().startswith("{"):  # Parse would take [] as {} and "abc" as an object of one-letter fields
        raise InvalidRequest(f"the body must be a JSON object: a {name} in protobuf JSON")
    try:
        return json_format.Parse(text, message)
    except json_format.ParseError as exc:
        raise InvalidRequest(f"the body is not a {name} in protobuf JSON: {exc}") from None


def _json(message: Message) -> Response:
    return Response(message_json(message), media_type=JSON)


def _timeout(request: Request) -> float | None:
    """The call's deadline as the seconds left: `Request-Timeout` (or `X-Request-Timeout`), like gRPC's header."""
    for name in TIMEOUT_HEADERS:
        value = request.headers.get(name)
        if value is not None:
            try:
                seconds = float(value)
            except ValueError:
                seconds = math.nan
            if not math.isfinite(seconds) or seconds <= 0:
                raise InvalidRequest(f"{name} must be a positive number of seconds, got {value!r}")
            return seconds
    return None


@contextlib.asynccontextmanager
async def _deadline(remaining: float | None) -> Any:
    if remaining is None:
        yield
        return
    try:
        async with asyncio.timeout(remaining):
            yield
    except TimeoutError:
        raise DeadlineExceeded(f"the request's timeout ({remaining:g} s) passed") from None


@contextlib.contextmanager
def _span(request: Request, route: str) -> Iterator[None]:
    """A server span, the child of the caller's `traceparent`, current while the handler starts the run (whose
    span becomes its child). Nothing when tracing is off: the no-op path costs a header parse otherwise."""
    if not telemetry.tracing_enabled():
        yield
        return
    parent = propagate.extract(dict(request.headers))
    with telemetry.tracer().start_as_current_span(
        f"{request.method} {route}", context=parent, kind=trace.SpanKind.SERVER, attributes={"http.route": route}
    ):
        yield
