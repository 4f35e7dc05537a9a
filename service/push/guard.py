"""The callback URL's guard: its form (scheme, length, no credentials), then the SSRF guard `tools.http_request`
applies to its hosts (`tools/_addresses.py`: every address a host resolves to must be public, unless its network is
allowed), checked when SubmitRun takes the URL and again before every send, whose connection then goes to the checked
addresses only (a later DNS answer cannot point it inward)."""

from __future__ import annotations

import httpx

from service.config import PushConfig
from tools._addresses import DEFAULT_PORTS, AddressGuard, Refused, Resolver, resolve

__all__ = ["MAX_URL_BYTES", "Refused", "UrlGuard"]

MAX_URL_BYTES = 2048


class UrlGuard:
    def __init__(self, config: PushConfig, resolver: Resolver = resolve) -> None:
        """`resolver`: the host's addresses (tests stand in for DNS)."""
        self.config = config
        self.hosts = AddressGuard(
            config.allow_private,
            refusal=": callbacks go to public addresses only (an operator can allow a network with push.allow_private)",
            resolver=resolver,
        )

    def parse(self, url: str) -> httpx.URL:
        """The URL, if its form is acceptable (scheme, host, no credentials in it)."""
        if len(url.encode()) > MAX_URL_BYTES:
            raise Refused(f"the url is longer than {MAX_URL_BYTES} bytes")
        try:
            parsed = httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise Refused(f"invalid url: {exc}") from None
        schemes = ("https",) if self.config.require_https else tuple(DEFAULT_PORTS)
        if parsed.scheme not in schemes or not parsed.host:
            raise Refused(f"the url must be an absolute {' or '.join(s + '://' for s in schemes)} URL")
        if parsed.userinfo:
            raise Refused("the url must not carry credentials; sign with the callback's secret instead")
        if parsed.port is not None and not 0 < parsed.port < 65536:  # httpx takes any; a send would then raise
            raise Refused(f"the url's port must be from 1 to 65535, got {parsed.port}")
        return parsed

    async def addresses(self, url: httpx.URL) -> tuple[str, ...]:
        """The addresses to connect to, all of them allowed; Refused otherwise (DNS failure included)."""
        return await self.hosts.addresses(url)
