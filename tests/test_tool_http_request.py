"""http_request against a real aiohttp server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import ValidationError

from tools import ToolConfig, ToolError
from tools.http_request import HttpRequest, create


async def _json(request: web.Request) -> web.Response:
    return web.json_response({"carrier": "NordLine Freight", "status": "ok"})


async def _echo(request: web.Request) -> web.Response:
    return web.json_response({"received": await request.json(), "trace": request.headers.get("X-Trace")})


async def _fail(request: web.Request) -> web.Response:
    return web.Response(status=503, text="maintenance")


async def _missing(request: web.Request) -> web.Response:
    return web.json_response({"error": "no such order"}, status=404)


async def _redirect(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "http://elsewhere.example/json"})


async def _big(request: web.Request) -> web.Response:
    return web.Response(text="x" * 5000)


async def _image(request: web.Request) -> web.Response:
    return web.Response(body=b"\x89PNG\r\n", content_type="image/png")


async def _slow(request: web.Request) -> web.Response:
    await asyncio.sleep(5)
    return web.Response(text="late")


@pytest.fixture
async def base_url() -> AsyncIterator[str]:
    app = web.Application()
    for path, handler in [
        ("/json", _json),
        ("/fail", _fail),
        ("/missing", _missing),
        ("/redirect", _redirect),
        ("/big", _big),
        ("/image", _image),
        ("/slow", _slow),
    ]:
        app.router.add_get(path, handler)
    app.router.add_post("/echo", _echo)
    # handler_cancellation: the slow handler stops when the client gives up, so cleanup does not wait for it.
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await runner.cleanup()


@pytest.fixture
async def tool(tmp_path: Path) -> AsyncIterator[HttpRequest]:
    options = {"allow_hosts": ["127.0.0.1"], "max_response_bytes": 1000, "timeout_s": 0.5}
    tool = create(ToolConfig(data_dir=tmp_path, options=options))
    try:
        yield tool
    finally:
        await tool.aclose()


async def call(tool: HttpRequest, **raw: Any) -> Any:
    return await tool.run(tool.validate(raw))


async def test_get_json_is_parsed(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/json")
    assert result["status"] == 200
    assert result["body"] == {"carrier": "NordLine Freight", "status": "ok"}
    assert result["headers"]["content-type"].startswith("application/json")
    assert result["truncated"] is False


async def test_post_sends_json_and_headers(tool: HttpRequest, base_url: str) -> None:
    body = {"order_id": 42, "items": [1, 2]}
    result = await call(tool, method="POST", url=f"{base_url}/echo", json_body=body, headers={"X-Trace": "abc"})
    assert result["body"] == {"received": body, "trace": "abc"}


async def test_host_not_on_the_allow_list(tool: HttpRequest, base_url: str, tmp_path: Path) -> None:
    port = base_url.rsplit(":", 1)[1]
    with pytest.raises(ToolError, match=f"host localhost:{port} is not on the allow-list") as caught:
        await call(tool, url=f"http://localhost:{port}/json")
    assert caught.value.retryable is False

    only_other_port = create(ToolConfig(data_dir=tmp_path, options={"allow_hosts": ["127.0.0.1:1"]}))
    nothing = create(ToolConfig(data_dir=tmp_path))
    try:
        for refusing in (only_other_port, nothing):
            with pytest.raises(ToolError, match="not on the allow-list"):
                await call(refusing, url=f"{base_url}/json")
    finally:
        await only_other_port.aclose()
        await nothing.aclose()


async def test_server_error_is_retryable(tool: HttpRequest, base_url: str) -> None:
    with pytest.raises(ToolError, match="upstream returned 503") as caught:
        await call(tool, url=f"{base_url}/fail")
    assert caught.value.retryable is True


async def test_client_error_is_a_result(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/missing")
    assert (result["status"], result["body"]) == (404, {"error": "no such order"})


async def test_redirect_is_not_followed(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/redirect")
    assert result["status"] == 302
    assert result["headers"]["location"] == "http://elsewhere.example/json"


async def test_oversized_body_is_truncated(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/big")
    assert result["truncated"] is True
    assert result["body"] == "x" * 1000
    assert result["headers"]["content-length"] == "5000"


async def test_binary_body_is_not_shown(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/image")
    assert result["body"] == "<6 bytes of image/png, not shown>"


async def test_connection_refused_is_retryable(tool: HttpRequest) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ToolError, match="failed") as caught:
        await call(tool, url=f"http://127.0.0.1:{port}/json")
    assert caught.value.retryable is True


async def test_timeout_is_retryable(tool: HttpRequest, base_url: str) -> None:
    with pytest.raises(ToolError, match=r"timed out after 0\.5 s") as caught:
        await call(tool, url=f"{base_url}/slow")
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    "raw",
    [
        {"url": "ftp://127.0.0.1/file"},
        {"url": "/relative"},
        {"url": "http://127.0.0.1/", "method": "DELETE"},
        {"url": "http://127.0.0.1/", "json_body": {"a": 1}},
        {"url": "http://127.0.0.1/", "headers": {"Host": "internal.example"}},
    ],
)
def test_bad_input_is_rejected(tool: HttpRequest, raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        tool.validate(raw)


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    for options in ({"allow_hosts": ["http://example.com/path"]}, {"allow_hosts": ["example.com:99999"]}, {"x": 1}):
        with pytest.raises(ValidationError):
            create(ToolConfig(data_dir=tmp_path, options=options))
