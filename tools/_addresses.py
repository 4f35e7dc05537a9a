"""The SSRF guard for every URL the service requests on someone's behalf (the `http_request` tool, the completion
push): the host is resolved first and every address it resolves to must be public, unless the operator allowed its
network. The connection then goes to the addresses just checked (`tools/_pinned.py`), never to a second lookup, so
a later DNS answer cannot point it inward (DNS rebinding).

Refused: loopback, link-local (cloud metadata 169.254.169.254), private, shared (100.64/10), unspecified, multicast,
reserved and site-local addresses, also when wrapped as IPv4-mapped IPv6 (::ffff:127.0.0.1) or 6to4 (2002::/16).

It lives under `tools/`, the lowest layer, because both the tool and the service use it (the service imports `tools`,
`tools` imports nothing of the service), and it needs no HTTP client, so the config's validators can use it cheaply.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Resolver = Callable[[str, int], Awaitable[list[str]]]

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_PORT = 65535


class Refused(Exception):
    """The host may not be connected to; the message says why, for the caller. `unresolved`: its name did not
    resolve, which may pass (a caller that retries can retry this one)."""

    def __init__(self, message: str, *, unresolved: bool = False) -> None:
        super().__init__(message)
        self.unresolved = unresolved


def networks(entries: Iterable[str], setting: str) -> list[IPNetwork]:
    """The CIDR networks of an `allow_private` setting; ValueError naming `setting` and the bad entry."""
    parsed: list[IPNetwork] = []
    for entry in entries:
        try:
            parsed.append(ipaddress.ip_network(entry, strict=False))
        except ValueError as exc:
            raise ValueError(f"bad {setting} entry {entry!r}: {exc}") from exc
    return parsed


async def resolve(host: str, port: int) -> list[str]:
    """The addresses `host` resolves to, each once, in the resolver's order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class AddressGuard:
    def __init__(
        self,
        allow_private: Iterable[str],
        *,
        refusal: str,
        literals_pass: bool = False,
        resolver: Resolver = resolve,
    ) -> None:
        """`allow_private`: the networks non-public addresses may be in (CIDR); `refusal`: what follows "<host>
        resolves to <ip>, a <kind> address" when that is refused (where to allow it); `literals_pass`: a host written
        as an IP address passes whatever it is (the caller's own allow-list named that address); `resolver`: the
        host's addresses (tests stand in for DNS)."""
        self.private = networks(allow_private, "allow_private")
        self.refusal = refusal
        self.literals_pass = literals_pass
        self.resolver = resolver

    async def addresses(self, url: httpx.URL) -> tuple[str, ...]:
        """The addresses to connect to for `url`, all of them allowed; Refused otherwise (DNS failure included, and a
        port outside 1–65535, which httpx parses but no connection can use: port 0 would otherwise read as unset)."""
        host = url.raw_host.decode("ascii")
        if url.port is not None and not 1 <= url.port <= MAX_PORT:
            raise Refused(f"{url.host}: port {url.port} is out of range; a port is from 1 to {MAX_PORT}")
        try:
            found = await self.resolver(host, url.port or DEFAULT_PORTS[url.scheme])
        except (OSError, UnicodeError) as exc:
            raise Refused(f"cannot resolve {url.host}: {exc}", unresolved=True) from exc
        if not found:
            raise Refused(f"cannot resolve {url.host}: no addresses", unresolved=True)
        literal = self.literals_pass and ip_or_none(host) is not None
        for address in found:
            ip = ip_or_none(address.split("%", 1)[0])
            if ip is None:
                raise Refused(f"{url.host} resolved to {address!r}, which is not an IP address")
            kind = non_public(ip)
            if kind is None or literal or any(within(ip, network) for network in self.private):
                continue
            article = "an" if kind[:1] in "aeiou" else "a"
            raise Refused(f"{url.host} resolves to {ip}, {article} {kind} address{self.refusal}")
        return tuple(found)


def ip_or_none(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def non_public(ip: IPAddress) -> str | None:
    """What kind of non-public address `ip` is (loopback, link-local…), or None for a public one."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is 127.0.0.1
        elif ip.sixtofour is not None:  # 2002:a9fe:a9fe::/48 routes, through a 6to4 relay, to 169.254.169.254
            inner = non_public(ip.sixtofour)
            return None if inner is None else f"{inner} (6to4)"
        elif ip.is_site_local:  # fec0::/10: deprecated, but still routed inside some networks; Python calls it global
            return "site-local"
    for kind in ("loopback", "link_local", "unspecified", "multicast", "reserved", "private"):
        if getattr(ip, f"is_{kind}"):
            return kind.replace("_", "-")
    return None if ip.is_global else "non-public"


def within(ip: IPAddress, network: IPNetwork) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None and network.version == 4:
        ip = ip.ipv4_mapped
    return ip.version == network.version and ip in network
