"""The callback URL's SSRF guard: the rule `tools.http_request` applies to its hosts (every address a host resolves
to must be public, unless its network is allowed), checked when SubmitRun takes the URL and again before every send,
whose connection then goes to the checked addresses only (a later DNS answer cannot point it inward)."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable

import httpx

from service.config import PushConfig
from tools.http_request import ip_or_none, non_public, within

_PORTS = {"http": 80, "https": 443}
MAX_URL_BYTES = 2048

Resolver = Callable[[str, int], Awaitable[list[str]]]


class Refused(Exception):
    """The URL may not be called; the message says why, for the caller."""


async def resolve(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class UrlGuard:
    def __init__(self, config: PushConfig, resolver: Resolver = resolve) -> None:
        """`resolver`: the host's addresses (tests stand in for DNS)."""
        self.config = config
        self.resolver = resolver
        self.private = [ipaddress.ip_network(n, strict=False) for n in config.allow_private]

    def parse(self, url: str) -> httpx.URL:
        """The URL, if its form is acceptable (scheme, host, no credentials in it)."""
        if len(url.encode()) > MAX_URL_BYTES:
            raise Refused(f"the url is longer than {MAX_URL_BYTES} bytes")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise Refused(f"invalid url: {exc}") from None
        schemes = ("https",) if self.config.require_https else tuple(_PORTS)
        if parsed.scheme not in schemes or not parsed.host:
            raise Refused(f"the url must be an absolute {' or '.join(s + '://' for s in schemes)} URL")
        if parsed.userinfo:
            raise Refused("the url must not carry credentials; sign with the callback's secret instead")
        if parsed.port is not None and not 0 < parsed.port < 65536:  # httpx takes any; a send would then raise
            raise Refused(f"the url's port must be from 1 to 65535, got {parsed.port}")
        return parsed

    async def addresses(self, url: httpx.URL) -> tuple[str, ...]:
        """The addresses to connect to, all of them allowed; Refused otherwise (DNS failure included)."""
        host = url.raw_host.decode("ascii")
        try:
            found = await self.resolver(host, url.port or _PORTS[url.scheme])
        except (OSError, UnicodeError) as exc:
            raise Refused(f"cannot resolve {url.host}: {exc}") from None
        if not found:
            raise Refused(f"cannot resolve {url.host}: no addresses")
        for address in found:
            ip = ip_or_none(address.split("%", 1)[0])
            if ip is None:
                raise Refused(f"{url.host} resolved to {address!r}, which is not an IP address")
            kind = non_public(ip)
            if kind is not None and not any(within(ip, network) for network in self.private):
                raise Refused(
                    f"{url.host} resolves to {ip}, a {kind} address: callbacks go to public addresses only (an "
                    "operator can allow a network with push.allow_private)"
                )
        return tuple(found)
