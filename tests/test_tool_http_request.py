"""http_request against a real aiohttp server on 127.0.0.1: requests, caps, redirects re-checked hop by hop, and the
address rules (names resolved first, non-public addresses refused unless allowed, the connection pinned to the
checked address). DNS is stood in for by replacing the resolver of the tool's guard, so no test needs a network."""

from __future__ import annotations

import asyncio
import functools
import gzip
import socket
import struct
import sys
import tracemalloc
import zlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from aiohttp import web
from pydantic import ValidationError

from tools import ToolConfig, ToolError, _http_body
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


async def _hop(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/json"})  # relative: resolved against the request URL


async def _loop(request: web.Request) -> web.Response:
    return web.Response(status=307, headers={"Location": "/loop"})


async def _to_ftp(request: web.Request) -> web.Response:
    return web.Response(status=301, headers={"Location": "ftp://127.0.0.1/file"})


async def _see_other(request: web.Request) -> web.Response:
    return web.Response(status=303, headers={"Location": "/json"})


async def _elsewhere(request: web.Request) -> web.Response:
    """To another origin: `?to=` names it."""
    return web.Response(status=302, headers={"Location": request.query["to"]})


async def _headers(request: web.Request) -> web.Response:
    return web.json_response(
        {"host": request.headers.get("Host"), "authorization": request.headers.get("Authorization")}
    )


async def _big(request: web.Request) -> web.Response:
    return web.Response(text="x" * 5000)


async def _image(request: web.Request) -> web.Response:
    return web.Response(body=b"\x89PNG\r\n", content_type="image/png")


def _deep_json() -> str:
    """Arrays nested past the recursion limit, which json.loads' C parser also keeps (the test runner raises it)."""
    depth = sys.getrecursionlimit() + 100
    return "[" * depth + "]" * depth


async def _deep(request: web.Request) -> web.Response:
    return web.Response(text=_deep_json(), content_type="application/json")


def _gzip(*parts: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    return b"".join([*(compressor.compress(part) for part in parts), compressor.flush()])


@functools.cache
def _bomb() -> bytes:
    """50 MB of zeros in ~50 KB of gzip (~100 bytes once gzipped again)."""
    return _gzip(*[bytes(2**20)] * 50)


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


def _gzip_padded(data: bytes, empty_blocks: int) -> bytes:
    """Valid gzip of `data` whose deflate stream starts with `empty_blocks` empty blocks: 5 bytes each, no output."""
    header, trailer = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\x03", struct.pack("<II", zlib.crc32(data), len(data))
    return header + b"\x00\x00\x00\xff\xff" * empty_blocks + _raw_deflate(data) + trailer


_CARRIER = b'{"carrier": "NordLine Freight"}'
# ?body= names one: (Content-Encoding, the body as sent)
ENCODED: dict[str, tuple[str, Callable[[], bytes]]] = {
    "gzip": ("gzip", lambda: gzip.compress(_CARRIER)),
    "x-gzip": ("x-gzip", lambda: gzip.compress(_CARRIER)),
    "deflate": ("deflate", lambda: zlib.compress(_CARRIER)),
    "raw-deflate": ("deflate", lambda: _raw_deflate(_CARRIER)),
    "identity": ("identity", lambda: _CARRIER),
    "bomb": ("gzip", _bomb),
    "double-bomb": ("gzip, gzip", lambda: _gzip(_bomb())),
    "br": ("br", lambda: b"\x0b\x0f\x80" + _CARRIER + b"\x03"),  # brotli's uncompressed meta-block
    "not-gzip": ("gzip", lambda: _CARRIER),
    "padded": ("gzip", lambda: _gzip_padded(b'"late"', 40_000)),  # 200 KB on the wire for 6 bytes
}


async def _encoded(request: web.Request) -> web.Response:
    coding, body = ENCODED[request.query["body"]]
    return web.Response(body=body(), headers={"Content-Encoding": coding, "Content-Type": "application/json"})


async def _typed(request: web.Request) -> web.Response:
    """The body `?hex=` with the Content-Type `?type=`."""
    return web.Response(body=bytes.fromhex(request.query["hex"]), headers={"Content-Type": request.query["type"]})


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
        ("/deep", _deep),
        ("/hop", _hop),
        ("/loop", _loop),
        ("/to-ftp", _to_ftp),
        ("/elsewhere", _elsewhere),
        ("/headers", _headers),
        ("/encoded", _encoded),
        ("/typed", _typed),
    ]:
        app.router.add_get(path, handler)
    app.router.add_post("/echo", _echo)
    app.router.add_post("/see-other", _see_other)
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


def make(tmp_path: Path, **options: Any) -> HttpRequest:
    return create(ToolConfig(data_dir=tmp_path, options={"timeout_s": 2, **options}))


def fake_dns(tool: HttpRequest, answers: dict[str, list[str]]) -> list[str]:
    """Answer lookups for `answers`' names from it (others as usual); returns the list of names looked up."""
    looked_up: list[str] = []
    real = tool._guard.resolver

    async def resolve(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return answers[host] if host in answers else await real(host, port)

    tool._guard.resolver = resolve
    return looked_up


async def test_get_json_is_parsed(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/json")
    assert result["status"] == 200
    assert result["body"] == {"carrier": "NordLine Freight", "status": "ok"}
    assert result["headers"]["content-type"].startswith("application/json")
    assert result["truncated"] is False


async def test_json_nested_past_the_parsers_limit_comes_back_as_text(base_url: str, tmp_path: Path) -> None:
    tool = make(tmp_path, allow_hosts=["127.0.0.1"], max_response_bytes=len(_deep_json()) + 1)
    try:
        result = await call(tool, url=f"{base_url}/deep")
    finally:
        await tool.aclose()
    assert result["status"] == 200 and result["body"] == _deep_json()  # was a RecursionError


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
        with pytest.raises(ToolError, match="host 127.0.0.1:0 is not on the allow-list"):  # was named :80
            await call(only_other_port, url="http://127.0.0.1:0/json")
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


async def test_redirect_off_the_allow_list_is_refused(tool: HttpRequest, base_url: str) -> None:
    with pytest.raises(ToolError, match="redirect to host elsewhere.example is not on the allow-list") as caught:
        await call(tool, url=f"{base_url}/redirect")
    assert caught.value.retryable is False


async def test_redirect_is_returned_when_following_is_off(base_url: str, tmp_path: Path) -> None:
    tool = make(tmp_path, allow_hosts=["127.0.0.1"], follow_redirects=0)
    try:
        result = await call(tool, url=f"{base_url}/redirect")
    finally:
        await tool.aclose()
    assert result["status"] == 302
    assert result["headers"]["location"] == "http://elsewhere.example/json"


async def test_redirects_on_allowed_hosts_are_followed(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/hop")
    assert (result["status"], result["url"]) == (200, f"{base_url}/json")
    assert result["body"]["carrier"] == "NordLine Freight"
    # 303 after POST: the redirect target is fetched with GET, without the body
    result = await call(tool, method="POST", url=f"{base_url}/see-other", json_body={"a": 1})
    assert (result["status"], result["url"]) == (200, f"{base_url}/json")


async def test_redirect_loops_and_other_schemes_are_refused(tool: HttpRequest, base_url: str) -> None:
    with pytest.raises(ToolError, match=r"more than 3 redirect\(s\)"):
        await call(tool, url=f"{base_url}/loop")
    with pytest.raises(ToolError, match="only http:// and https:// URLs are followed"):
        await call(tool, url=f"{base_url}/to-ftp")


async def test_redirect_to_an_allowed_name_is_checked_by_address_and_loses_credentials(
    base_url: str, tmp_path: Path
) -> None:
    port = base_url.rsplit(":", 1)[1]
    target = f"http://api.test:{port}/headers"
    tool = make(tmp_path, allow_hosts=["127.0.0.1", "api.test"])
    fake_dns(tool, {"api.test": ["127.0.0.1"]})
    try:
        # api.test is on the allow-list, but it resolves to loopback, which only allow_private can permit
        with pytest.raises(ToolError, match="api.test resolves to 127.0.0.1, a loopback address; refused"):
            await call(tool, url=f"{base_url}/elsewhere?to={target}", headers={"Authorization": "Bearer s3cret"})
    finally:
        await tool.aclose()
    tool = make(tmp_path, allow_hosts=["127.0.0.1", "api.test"], allow_private=["127.0.0.0/8"])
    fake_dns(tool, {"api.test": ["127.0.0.1"]})
    try:
        result = await call(tool, url=f"{base_url}/elsewhere?to={target}", headers={"Authorization": "Bearer s3cret"})
    finally:
        await tool.aclose()
    assert result["url"] == target
    assert result["body"] == {"host": f"api.test:{port}", "authorization": None}  # not sent to another origin


async def test_connection_goes_to_the_checked_address_with_the_original_host(base_url: str, tmp_path: Path) -> None:
    """api.test exists in no DNS: the request can only work by connecting to the address that was checked."""
    port = base_url.rsplit(":", 1)[1]
    tool = make(tmp_path, allow_hosts=["api.test"], allow_private=["127.0.0.1/32"])
    looked_up = fake_dns(tool, {"api.test": ["127.0.0.1"]})
    try:
        result = await call(tool, url=f"http://api.test:{port}/headers", headers={"Authorization": "Bearer t"})
    finally:
        await tool.aclose()
    assert result["body"] == {"host": f"api.test:{port}", "authorization": "Bearer t"}
    assert looked_up == ["api.test"]  # one lookup, and the connection used its answer: no second lookup to rebind


@pytest.mark.parametrize(
    ("addresses", "kind"),
    [
        (["169.254.169.254"], "link-local"),  # cloud metadata
        (["127.0.0.1"], "loopback"),
        (["::1"], "loopback"),
        (["::ffff:127.0.0.1"], "loopback"),
        (["10.1.2.3"], "private"),
        (["172.16.0.9"], "private"),
        (["192.168.1.1"], "private"),
        (["fc00::5"], "private"),
        (["fe80::1"], "link-local"),
        (["0.0.0.0"], "unspecified"),
        (["224.0.0.1"], "multicast"),
        (["240.0.0.1"], "reserved"),
        (["100.64.0.1"], "non-public"),  # carrier-grade NAT
        (["2002:a9fe:a9fe::1"], r"link-local \(6to4\)"),  # the metadata address through a 6to4 relay
        (["2002:a00:1::1"], r"private \(6to4\)"),
        (["fec0::1"], "site-local"),
        (["93.184.215.14", "10.0.0.1"], "private"),  # any bad address refuses the host
    ],
)
async def test_non_public_addresses_are_refused(tmp_path: Path, addresses: list[str], kind: str) -> None:
    tool = make(tmp_path, allow_hosts=["api.test"], allow_private=["10.200.0.0/16"])
    fake_dns(tool, {"api.test": addresses})
    try:
        with pytest.raises(
            ToolError, match=f"resolves to .*, {'an' if kind[0] in 'aeiou' else 'a'} {kind} address; refused"
        ) as caught:
            await call(tool, url="http://api.test/")
    finally:
        await tool.aclose()
    assert caught.value.retryable is False


async def test_public_and_allowed_private_addresses_pass_the_check(tmp_path: Path) -> None:
    tool = make(tmp_path, allow_hosts=["api.test"], allow_private=["10.200.0.0/16", "fd00::/8"])
    fake_dns(tool, {"api.test": ["93.184.215.14", "10.200.3.4", "fd00::1", "2606:4700::1111"]})
    try:
        checked = await tool._checked_addresses(httpx.URL("https://api.test/"))
    finally:
        await tool.aclose()
    assert checked == ("93.184.215.14", "10.200.3.4", "fd00::1", "2606:4700::1111")


async def test_unresolvable_host_is_a_retryable_error(tmp_path: Path) -> None:
    tool = make(tmp_path, allow_hosts=["gone.test"])

    async def no_answer(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    tool._guard.resolver = no_answer
    try:
        with pytest.raises(ToolError, match="cannot resolve gone.test: .*Name or service not known") as caught:
            await call(tool, url="http://gone.test/")
    finally:
        await tool.aclose()
    assert caught.value.retryable is True


async def test_oversized_body_is_truncated(tool: HttpRequest, base_url: str) -> None:
    result = await call(tool, url=f"{base_url}/big")
    assert result["truncated"] is True
    assert result["body"] == "x" * 1000
    assert result["headers"]["content-length"] == "5000"


@pytest.mark.parametrize("body", ["gzip", "x-gzip", "deflate", "raw-deflate", "identity"])
async def test_compressed_bodies_are_decoded(tool: HttpRequest, base_url: str, body: str) -> None:
    result = await call(tool, url=f"{base_url}/encoded?body={body}")
    assert (result["body"], result["truncated"]) == ({"carrier": "NordLine Freight"}, False)


async def test_gzip_bomb_is_decoded_only_up_to_the_cap(tool: HttpRequest, base_url: str) -> None:
    _bomb()  # made before memory is traced
    tracemalloc.start()
    try:
        result = await call(tool, url=f"{base_url}/encoded?body=bomb")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert (result["body"], result["truncated"]) == ("\0" * 1000, True)
    assert peak < 5 * 2**20  # was > 50 MB: httpx inflated each network read in full before the cap was looked at


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("double-bomb", "encoded as 'gzip, gzip'; only a single gzip or deflate encoding is read"),  # was 50 MB
        ("br", "encoded as 'br'; only a single gzip or deflate"),  # was shown still encoded
        ("not-gzip", "not valid gzip"),
    ],
)
async def test_other_encodings_are_refused(tool: HttpRequest, base_url: str, body: str, message: str) -> None:
    with pytest.raises(ToolError, match=message) as caught:
        await call(tool, url=f"{base_url}/encoded?body={body}")
    assert caught.value.retryable is False


async def test_compressed_body_is_capped_on_the_wire_too(tool: HttpRequest, base_url: str) -> None:
    """Deflate can send any number of bytes that decode to nothing: reading stops past the cap + 64 KiB."""
    result = await call(tool, url=f"{base_url}/encoded?body=padded")
    assert (result["body"], result["truncated"]) == ("", True)  # was all 200 KB read for '"late"'


@pytest.mark.parametrize(
    ("content_type", "body", "shown"),
    [
        ("text/plain; charset=punycode", "héllo".encode(), "héllo"),  # punycode decodes in quadratic time
        ("text/plain; charset=unicode_escape", b"\\x41", "\\x41"),  # was "A": any Python codec
        ("text/plain; charset*=punycode''abc-", b"abc", "abc"),  # RFC 2231 is not read
        ("text/plain; charset=ISO-8859-1", b"caf\xe9", "café"),
        ('text/plain; charset="windows-1252"', b"\x80", "€"),
        ("text/plain;charset=US_ASCII", b"caf\xe9", "caf\ufffd"),
        ("application/json; charset=UTF-16", '{"a": "é"}'.encode("utf-16"), {"a": "é"}),
        ("text/plain", "é".encode(), "é"),
    ],
)
async def test_only_text_charsets_are_used(
    tool: HttpRequest, base_url: str, content_type: str, body: bytes, shown: Any
) -> None:
    result = await call(tool, url=f"{base_url}/typed?{urlencode({'type': content_type, 'hex': body.hex()})}")
    assert result["body"] == shown


@pytest.mark.parametrize("codec", ["utf-8", "utf-16", "utf-32-be", "cp1252", "ascii"])
def test_text_is_decoded_in_pieces_with_turns_for_the_event_loop(codec: str) -> None:
    """Some charsets' error handling costs ~250 ms per MiB (windows-1252's undefined bytes): decoded in one call, it
    held the event loop that long."""
    data = ("é€😀x" * 20_000).encode(codec, errors="replace") + b"\x81\xff"  # characters across piece boundaries
    decoding = _http_body._decoded(data, codec)
    turns = 0
    while True:  # drive the coroutine by hand, counting the turns it gives the event loop
        try:
            decoding.send(None)
        except StopIteration as done:
            text = done.value
            break
        turns += 1
    assert text == data.decode(codec, errors="replace")
    assert turns == (len(data) - 1) // _http_body._DECODE_PIECE  # one after each piece but the last


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
        {"url": "http://127.0.0.1/", "headers": {"X-A": "a\r\nX-Injected: 1"}},
        {"url": "http://127.0.0.1/", "headers": {"X-A\nB": "a"}},
        {"url": "http://127.0.0.1/", "method": "POST", "json_body": {"a": float("nan")}},
        {"url": "http://127.0.0.1/", "method": "POST", "json_body": "x" * (1024 * 1024 + 1)},
        {"url": "http://127.0.0.1/" + "a" * 9000},
    ],
)
def test_bad_input_is_rejected(tool: HttpRequest, raw: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        tool.validate(raw)


def test_deeply_nested_body_is_rejected_not_raised(tool: HttpRequest) -> None:
    body: Any = 1
    for _ in range(5000):
        body = [body]
    with pytest.raises(ValidationError, match="nested too deeply"):
        tool.validate({"url": "http://127.0.0.1/", "method": "POST", "json_body": body})


def test_bad_options_are_rejected(tmp_path: Path) -> None:
    for options in (
        {"allow_hosts": ["http://example.com/path"]},
        {"allow_hosts": ["example.com:99999"]},
        {"x": 1},
        {"allow_private": ["10.0.0.0/33"]},
        {"follow_redirects": -1},
    ):
        with pytest.raises(ValidationError):
            create(ToolConfig(data_dir=tmp_path, options=options))
