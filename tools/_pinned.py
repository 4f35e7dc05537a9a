"""Connections that go only where the SSRF guard (`tools/_addresses.py`) said: within `connect_only_to(url,
addresses)` a `pinned_client` connects to the URL's host at those addresses and nowhere else, never through a fresh
DNS answer. TLS is started with the host name, so SNI and certificate checks are unchanged."""

from __future__ import annotations

import typing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar

import httpcore
import httpx

# The checked addresses of the host being requested, per task: the transport connects only to these.
_PINNED: ContextVar[Mapping[str, tuple[str, ...]] | None] = ContextVar("pinned_addresses", default=None)


@contextmanager
def connect_only_to(url: httpx.URL, addresses: tuple[str, ...]) -> Iterator[None]:
    """Within this block a `pinned_client` connects to `url`'s host at `addresses` (checked by `AddressGuard`)."""
    token = _PINNED.set({url.raw_host.decode("ascii"): addresses})
    try:
        yield
    finally:
        _PINNED.reset(token)


def pinned_client(timeout: httpx.Timeout | float, headers: Mapping[str, str] | None = None) -> httpx.AsyncClient:
    """An httpx client that connects only where `connect_only_to` says. It follows no redirects (a redirect's host
    must be checked first), and ignores proxy variables from the environment (they would route around the guard)."""
    return httpx.AsyncClient(
        transport=_PinnedTransport(), follow_redirects=False, trust_env=False, timeout=timeout, headers=headers
    )


class _PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects to the addresses `connect_only_to` set for the host, never to a fresh DNS answer; a host with no
    such addresses is not connected to at all. TLS is started by httpcore with the host name, so SNI and certificate
    checks are unchanged."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        local_address: str | None = None,
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = (_PINNED.get() or {}).get(host)
        if not addresses:
            raise httpcore.ConnectError(f"{host}: no checked address to connect to")
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(address, port, timeout, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's interface
        socket_options: typing.Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not used by a pinned client")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class _PinnedTransport(httpx.AsyncHTTPTransport):
    """httpx's transport over a connection pool whose network backend is `_PinnedBackend`. httpx has no public
    parameter for the backend, so the pool is replaced after construction (the tests fail if that stops working)."""

    def __init__(self) -> None:
        super().__init__(trust_env=False)
        limits = httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=5.0)
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(trust_env=False),
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            network_backend=_PinnedBackend(),
        )
