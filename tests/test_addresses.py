"""The SSRF guard shared by `http_request` and the completion push (`tools/_addresses.py`), on its own: which
addresses are refused, what the operator's networks let through, and that one bad answer among good ones refuses the
host. DNS is a dict, so no test needs a network."""

from __future__ import annotations

import socket

import httpx
import pytest

from tools._addresses import AddressGuard, Refused, networks

REFUSAL = "; refused (allow it with test.allow_private)"


def guard(answers: dict[str, list[str]], allow_private: list[str] | None = None, **options: bool) -> AddressGuard:
    async def dns(host: str, port: int) -> list[str]:
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return answers[host]

    return AddressGuard(allow_private or [], refusal=REFUSAL, resolver=dns, **options)


@pytest.mark.parametrize(
    ("address", "kind"),
    [
        ("10.1.2.3", "private"),
        ("172.16.0.9", "private"),
        ("192.168.1.1", "private"),
        ("127.0.0.1", "loopback"),
        ("169.254.169.254", "link-local"),  # cloud metadata
        ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"),  # carrier-grade NAT
        ("fc00::5", "private"),
        ("fd12:3456::1", "private"),
        ("::1", "loopback"),
        ("fe80::1", "link-local"),
        ("fe80::1%eth0", "link-local"),  # a scoped answer is checked without its zone
        ("::", "unspecified"),
        ("fec0::1", "site-local"),
        ("::ffff:127.0.0.1", "loopback"),  # IPv4-mapped IPv6 is the IPv4 address
        ("::ffff:10.0.0.1", "private"),
        ("::ffff:169.254.169.254", "link-local"),
        ("2002:a9fe:a9fe::1", r"link-local \(6to4\)"),  # the metadata address through a 6to4 relay
    ],
)
async def test_a_non_public_address_is_refused_with_its_kind(address: str, kind: str) -> None:
    article = "an" if kind[0] in "aeiou" else "a"  # "an unspecified address"
    with pytest.raises(Refused, match=f"^api.test resolves to .*, {article} {kind} address; refused") as caught:
        await guard({"api.test": [address]}).addresses(httpx.URL("https://api.test/"))
    assert caught.value.unresolved is False
    assert str(caught.value).endswith(REFUSAL)


async def test_public_addresses_pass_in_the_resolvers_order() -> None:
    answers = ["93.184.215.14", "2606:4700::1111", "2002:5db8:d70e::1"]  # the last: 6to4 of a public address
    assert await guard({"api.test": answers}).addresses(httpx.URL("http://api.test/")) == tuple(answers)


@pytest.mark.parametrize(
    "answers",
    [
        ["93.184.215.14", "10.0.0.1"],
        ["10.0.0.1", "93.184.215.14"],
        ["2606:4700::1111", "::ffff:127.0.0.1"],
        ["93.184.215.14", "fe80::1"],
    ],
)
async def test_one_non_public_answer_among_public_ones_refuses_the_host(answers: list[str]) -> None:
    """Connecting to "the public one" would not do: a client may try the others when it fails."""
    with pytest.raises(Refused, match="resolves to"):
        await guard({"api.test": answers}).addresses(httpx.URL("http://api.test/"))


async def test_allowed_networks_let_their_addresses_through_and_no_others() -> None:
    allowed = ["10.200.0.0/16", "fd00::/8", "127.0.0.1/32"]
    checked = guard({"api.test": ["10.200.3.4", "fd00::1", "::ffff:127.0.0.1", "93.184.215.14"]}, allowed)
    got = await checked.addresses(httpx.URL("http://api.test/"))
    assert got == ("10.200.3.4", "fd00::1", "::ffff:127.0.0.1", "93.184.215.14")  # a mapped address, by its IPv4
    for outside in ("10.201.0.1", "127.0.0.2", "fe80::1"):
        with pytest.raises(Refused, match=f"resolves to {outside}"):
            await guard({"api.test": [outside]}, allowed).addresses(httpx.URL("http://api.test/"))


async def test_an_ip_literal_passes_only_when_literals_pass() -> None:
    answers = {"127.0.0.1": ["127.0.0.1"]}
    with pytest.raises(Refused, match="127.0.0.1 resolves to 127.0.0.1, a loopback address"):
        await guard(answers).addresses(httpx.URL("http://127.0.0.1:8080/"))
    passing = guard(answers, literals_pass=True)
    assert await passing.addresses(httpx.URL("http://127.0.0.1:8080/")) == ("127.0.0.1",)
    with pytest.raises(Refused):  # a name is still checked
        await guard({"api.test": ["127.0.0.1"]}, literals_pass=True).addresses(httpx.URL("http://api.test/"))


async def test_a_name_that_does_not_resolve_is_refused_as_unresolved() -> None:
    with pytest.raises(Refused, match="cannot resolve gone.test: .*Name or service not known") as caught:
        await guard({}).addresses(httpx.URL("http://gone.test/"))
    assert caught.value.unresolved is True
    with pytest.raises(Refused, match="cannot resolve empty.test: no addresses") as caught:
        await guard({"empty.test": []}).addresses(httpx.URL("http://empty.test/"))
    assert caught.value.unresolved is True


async def test_an_answer_that_is_not_an_address_is_refused() -> None:
    with pytest.raises(Refused, match="resolved to 'example.com', which is not an IP address") as caught:
        await guard({"api.test": ["example.com"]}).addresses(httpx.URL("http://api.test/"))
    assert caught.value.unresolved is False


async def test_the_port_looked_up_is_the_urls_or_its_schemes() -> None:
    ports: list[int] = []

    async def dns(host: str, port: int) -> list[str]:
        ports.append(port)
        return ["93.184.215.14"]

    checked = AddressGuard([], refusal="", resolver=dns)
    for url in ("http://api.test/", "https://api.test/", "https://api.test:8443/"):
        await checked.addresses(httpx.URL(url))
    assert ports == [80, 443, 8443]


def test_networks_name_the_setting_and_the_bad_entry() -> None:
    assert [str(n) for n in networks(["10.0.0.1/8", "fd00::/8"], "x.allow_private")] == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ValueError, match=r"bad push.allow_private entry '10.0.0.0/33'"):
        networks(["10.0.0.0/33"], "push.allow_private")


@pytest.mark.parametrize("port", [0, 65536, 99999])
async def test_a_port_out_of_range_is_refused_before_any_lookup(port: int) -> None:
    # port 0 used to read as unset (the scheme's port), and 65536 went on to the resolver and the connection
    with pytest.raises(Refused, match=f"^api.test: port {port} is out of range; a port is from 1 to 65535$") as caught:
        await guard({"api.test": ["93.184.215.14"]}).addresses(httpx.URL(f"https://api.test:{port}/"))
    assert caught.value.unresolved is False  # not worth a retry


async def test_the_ports_at_the_ends_of_the_range_pass() -> None:
    for port in (1, 65535):
        assert await guard({"api.test": ["93.184.215.14"]}).addresses(httpx.URL(f"http://api.test:{port}/"))
