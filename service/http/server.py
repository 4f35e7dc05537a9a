"""The HTTP face's server: uvicorn, on the event loop the gRPC server runs on (a task, no second process or
thread), listening on `http_listen`, with `tls` when that is set."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.config import Config
from service.http.app import PEER_NAMES
from service.http.status import error_body

log = logging.getLogger(__name__)
# uvicorn says "Started server process" and "Finished server process" at INFO: in this process they would be wrong
logging.getLogger("uvicorn.error").setLevel(logging.WARNING)


class HttpServer:
    """`start` binds and serves; `port` is the bound port (useful with port 0); `stop` closes the listener and gives
    open streams `grace` seconds (the drain ended their runs by then, which ends their streams)."""

    def __init__(self, app: ASGIApp, config: Config) -> None:
        self.config = config
        self.socket = _bind(config.http_listen or "", reuse_port=config.workers > 1)
        self.port = int(self.socket.getsockname()[1])
        tls = config.tls
        self.server = _Server(
            uvicorn.Config(
                app,
                http=_protocol(config.limits.max_header_bytes),
                ssl_certfile=None if tls is None else str(tls.cert_file),
                ssl_keyfile=None if tls is None else str(tls.key_file),
                ssl_ca_certs=None if tls is None or tls.client_ca_file is None else str(tls.client_ca_file),
                # asked for, checked when given, not required: a browser has none and sends a bearer token
                ssl_cert_reqs=ssl.CERT_OPTIONAL if tls is not None and tls.client_ca_file else ssl.CERT_NONE,
                # uvicorn counts the connection asking among the open ones: N + 1 lets N be served at once
                limit_concurrency=config.http.max_streams + 1,
                h11_max_incomplete_event_size=config.limits.max_header_bytes,
                timeout_graceful_shutdown=2,
                backlog=4096,
                lifespan="off",
                log_config=None,  # the service's JSON logging
                access_log=False,
                server_header=False,
            )
        )
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve([self.socket]), name="http-face")
        while not self.server.started:  # startup is quick (the socket is bound): a few turns of the loop
            if self.task.done():
                self.task.result()  # raises why it could not start
            await asyncio.sleep(0.005)
        log.info("serving http", extra={"http_listen": self.config.http_listen, "port": self.port})

    async def stop(self) -> None:
        if self.task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.task = None


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # the service's own handlers drain on SIGTERM/SIGINT (rpc/server.py `serve`); uvicorn's would replace them
        yield


def _protocol(max_head_bytes: int) -> type[Any]:
    """uvicorn's HTTP/1.1 protocol on httptools (a parser in C; h11's, in Python, costs more per request), noting
    the client certificate's identities in each request's state: uvicorn puts no TLS information in the ASGI scope,
    and the app sees nothing of the transport. A request line and headers longer than `max_head_bytes` get 431 and
    the connection is closed: httptools has no bound of its own (a 20 MB header was read whole)."""

    class PeerProtocol(HttpToolsProtocol):
        in_head = True  # reading a request line and headers
        head_bytes = 0  # of them so far
        tail = b""  # the last bytes of the head so far: its end may span two reads

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            ssl_object = transport.get_extra_info("ssl_object")
            peer = ssl_object.getpeercert() if ssl_object is not None else None
            if peer:
                self.app_state = {**self.app_state, PEER_NAMES: peer_names(peer)}

        def data_received(self, data: bytes) -> None:
            if self.in_head:  # counted before the parser keeps it; the body after the head's end is not
                window = self.tail + data
                end = window.find(b"\r\n\r\n")
                self.head_bytes += len(data) if end < 0 else end + 4 - len(self.tail)
                if self.head_bytes > max_head_bytes:
                    self.transport.write(_HEAD_TOO_LARGE)
                    self.transport.close()
                    return
                self.tail = window[-3:] if end < 0 else b""
            super().data_received(data)

        def on_headers_complete(self) -> None:
            self.in_head = False
            super().on_headers_complete()

        def on_message_complete(self) -> None:  # the next request's head follows (its first read may go uncounted)
            self.in_head, self.head_bytes, self.tail = True, 0, b""
            super().on_message_complete()

    return PeerProtocol


# the face's JSON error, as `status.error_body` makes it (built here once: it is sent from the protocol, before any app)
_TOO_LARGE_BODY = error_body("RESOURCE_EXHAUSTED", "the request line and headers are too large", "HEADERS_TOO_LARGE")
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(_TOO_LARGE_BODY), _TOO_LARGE_BODY)
)


def peer_names(cert: dict[str, Any]) -> list[str]:
    """A verified certificate's identities as the gRPC face reads them: its subject alternative names, or its
    common name when it has none (RFC 6125)."""
    sans = [value for _kind, value in cert.get("subjectAltName", ())]
    if sans:
        return sans
    return [value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"]


def _bind(address: str, *, reuse_port: bool) -> socket.socket:
    host, _, port = address.rpartition(":")
    host = host.strip("[]") or "0.0.0.0"
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:  # the workers of --workers N share the port, as they share the gRPC one
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, int(port)))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot serve http on {address}: {exc.strerror or exc}") from exc
    sock.listen(4096)
    sock.set_inheritable(True)
    return sock
