"""The run viewer: one static page at `/` of the HTTP face (docs/viewer.md), with its script and style under
`/static/`. The files ship in the package (no build step, no CDN); the page calls the JSON and SSE routes like any
client, with the caller's bearer token, so these routes hold no data and need no authentication of their own."""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from service.http.status import error_body

STATIC = Path(__file__).with_name("static")

# Defence in depth behind the script's own rule (model and tool text only ever go in as textContent): the page may
# load and call nothing but its own origin, run no inline script, and be framed by no other site.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


async def index(_: Request) -> Response:
    return FileResponse(STATIC / "index.html", media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)


class _StaticFiles(StaticFiles):
    """Starlette's static files with the page's security headers; `no-cache` still lets the browser revalidate with
    the ETag, so a new release's script is picked up without a stale mix of old page and new script."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [
                    *message.get("headers", []),
                    *((k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()),
                ]
            await send(message)

        try:
            await super().__call__(scope, receive, send_with_headers)
        except HTTPException as exc:  # no such file (404) or a method but GET/HEAD (405): raised before any byte
            code, reason = (
                ("NOT_FOUND", "NO_SUCH_PATH") if exc.status_code == 404 else ("UNIMPLEMENTED", "WRONG_METHOD")
            )
            body = error_body(code, f"{exc.detail}: {scope.get('path', '')[:200]}", reason)
            await Response(body, exc.status_code, media_type="application/json", headers=exc.headers)(
                scope, receive, send
            )


def routes() -> list[BaseRoute]:
    """The viewer's routes, for the HTTP face's app."""
    return [
        Route("/", index, methods=["GET", "HEAD"]),
        Mount("/static", app=_StaticFiles(directory=STATIC), name="viewer-static"),
    ]
