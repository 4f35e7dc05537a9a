"""http_request: GET or POST to hosts on a configured allow-list, with the response read in a streaming fashion
and capped in size and time.

Hostile targets: the host is resolved before connecting and every address it resolves to must be public, unless
the operator allowed it (`allow_private` CIDRs, or the URL's host is an IP literal that is itself on `allow_hosts`);
the connection then goes to the addresses that were checked, never to a second lookup (the SSRF guard of
`tools/_addresses.py` and `tools/_pinned.py`, which the completion push shares). Redirects are followed up to
`follow_redirects` hops, each hop checked like the first request.

Every request carries the call's idempotency key (`tools.base.current_call()`) in an `Idempotency-Key` header, so
that an upstream that honours it recognises a request sent again (a retry, or a run recovered after a crash). A GET
changes nothing (HTTP's safe method); a POST is unsafe to repeat unless the operator declares otherwise.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tools._addresses import DEFAULT_PORTS, AddressGuard, Refused, networks
from tools._http_body import ACCEPT_ENCODING, read_capped, shown
from tools._pinned import connect_only_to, pinned_client
from tools.base import JSON, Tool, ToolConfig, ToolError, current_call
from tools.policy import BreakerPolicy, RetryPolicy, SideEffects, TimeoutPolicy, ToolPolicy

_SHOWN_HEADERS = ("content-type", "content-length", "location")
_MAX_BODY_BYTES = 1024 * 1024
# Headers that must not follow a redirect to another origin.
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.http_request options")

    allow_hosts: list[str] = Field(
        default_factory=list, description="'host' (any port) or 'host:port'; empty allows nothing"
    )
    timeout_s: float = Field(10.0, gt=0, description="Limit for the whole request, body included")
    max_response_bytes: int = Field(1024 * 1024, ge=1, description="Longer bodies are cut and marked truncated")
    allow_private: list[str] = Field(
        default_factory=list,
        description="Non-public networks (CIDR, e.g. 10.20.0.0/16) that allowed host names may resolve to",
    )
    follow_redirects: int = Field(3, ge=0, le=10, description="Redirect hops followed, each re-checked; 0: returned")
    idempotency_header: str | None = Field(
        "Idempotency-Key",
        min_length=1,
        pattern=r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$",
        description="Header that carries the call's idempotency key (run_id:call_id), unless the request sets it "
        "itself; null sends none",
    )

    @field_validator("allow_hosts")
    @classmethod
    def _parse_hosts(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            _parse_host_entry(entry)  # raises ValueError with the entry in the message
        return entries

    @field_validator("allow_private")
    @classmethod
    def _parse_networks(cls, entries: list[str]) -> list[str]:
        networks(entries, "allow_private")  # raises ValueError with the entry in the message
        return entries


def _parse_host_entry(entry: str) -> tuple[str, int | None]:
    try:
        parts = urlsplit(f"//{entry.strip()}")
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise ValueError(f"bad allow_hosts entry {entry!r}: {exc}") from exc
    if not host or parts.path or parts.username:
        raise ValueError(f"bad allow_hosts entry {entry!r}: expected 'host' or 'host:port'")
    return host.lower(), port


class RequestInput(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the model made up is an error it reads, not ignored

    method: Literal["GET", "POST"] = Field("GET", description="HTTP method.")
    url: str = Field(
        max_length=8192, description="Absolute http:// or https:// URL; its host must be on the allow-list."
    )
    headers: dict[str, str] | None = Field(
        None, max_length=50, description="Extra request headers, e.g. Accept or Authorization."
    )
    json_body: Any = Field(None, description="JSON body to send; POST only.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid URL: {exc}") from exc
        if url.scheme not in DEFAULT_PORTS or not url.host:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _no_host_header(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # Overriding Host would address another virtual host than the allow-listed one.
        if value and any(name.lower() == "host" for name in value):
            raise ValueError("the Host header is set from the url and cannot be overridden")
        for name, text in (value or {}).items():
            if not name or any(c in name for c in ":\r\n\0 ") or any(c in text for c in "\r\n\0"):
                raise ValueError(f"header {name[:50]!r}: names and values must not contain line breaks or NUL")
        return value

    @field_validator("json_body")
    @classmethod
    def _plain_json(cls, value: Any) -> Any:
        try:
            size = len(json.dumps(value, allow_nan=False))
        except RecursionError:
            raise ValueError("json_body is nested too deeply") from None
        except (ValueError, TypeError) as exc:
            raise ValueError(f"json_body must be plain JSON ({exc})") from None
        if size > _MAX_BODY_BYTES:
            raise ValueError(f"json_body is {size} bytes as JSON; the limit is {_MAX_BODY_BYTES}")
        return value

    @model_validator(mode="after")
    def _body_only_with_post(self) -> RequestInput:
        if self.json_body is not None and self.method != "POST":
            raise ValueError("json_body is only allowed with method POST")
        return self


class HttpRequest(Tool[RequestInput]):
    name: ClassVar[str] = "http_request"
    description: ClassVar[str] = (
        "Send an HTTP GET or POST to an internal HTTP API and read the answer. Use it when a question needs live "
        "data from a service the operator has allowed; only hosts on the allow-list can be reached, any other "
        "host is refused. POST sends `json_body` as JSON. The result is {status, headers (content-type, "
        "content-length, location), body, truncated}; body is parsed JSON when the response is JSON, text "
        "otherwise; url is where the answer came from. 4xx answers come back as results to read; redirects are "
        "followed a few hops as long as they stay on allowed hosts; 5xx, timeouts and connection failures are errors."
    )
    Input: ClassVar[type[BaseModel]] = RequestInput
    # Upstreams blip: retry timeouts, 5xx and connection errors a couple of times, and stop calling one that is down.
    # `side_effects` is a POST's: a GET is always "none" (`side_effects_of`). An operator whose upstreams all honour
    # the Idempotency-Key header can declare "idempotent" in `policies.http_request`.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=30),
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.25, max_backoff_s=4),
        breaker=BreakerPolicy(failure_threshold=5, cooldown_s=30),
        side_effects="unsafe",
        slow_s=5,
    )

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._allowed = {_parse_host_entry(entry) for entry in self._options.allow_hosts}
        # An IP literal passes: it is on allow_hosts (checked first), so the operator named the address.
        self._guard = AddressGuard(
            self._options.allow_private,
            refusal="; refused (an operator can allow the network with tools.http_request.allow_private)",
            literals_pass=True,
        )
        # Redirects are followed here, not by the client, so that each hop is checked.
        self._client = pinned_client(httpx.Timeout(self._options.timeout_s), {"Accept-Encoding": ACCEPT_ENCODING})

    async def aclose(self) -> None:
        await self._client.aclose()

    def side_effects_of(self, args: RequestInput, declared: SideEffects) -> SideEffects:
        return "none" if args.method == "GET" else declared

    def _headers(self, args: RequestInput) -> dict[str, str]:
        """The request's headers, with the call's idempotency key added. A key the request sets itself is kept: the
        model may be following an upstream's own rules for it (a format it checks, one key across several calls)."""
        headers = dict(args.headers or {})
        name, call = self._options.idempotency_header, current_call()
        if name is not None and call is not None and not any(k.lower() == name.lower() for k in headers):
            headers[name] = call.idempotency_key
        return headers

    def _check_allowed(self, url: httpx.URL, what: str = "host") -> None:
        host = url.host.lower()
        port = DEFAULT_PORTS[url.scheme] if url.port is None else url.port  # port 0 is 0, not the default
        if (host, None) in self._allowed or (host, port) in self._allowed:
            return
        shown = host if url.port is None else f"{host}:{port}"
        allowed = ", ".join(self._options.allow_hosts) or "nothing is allowed"
        raise ToolError(f"{what} {shown} is not on the allow-list (allowed: {allowed})")

    async def _checked_addresses(self, url: httpx.URL) -> tuple[str, ...]:
        """Resolve the URL's host and refuse it unless every address is public or allowed."""
        try:
            return await self._guard.addresses(url)
        except Refused as exc:
            raise ToolError(str(exc), retryable=exc.unresolved) from exc

    async def run(self, args: RequestInput) -> JSON:
        url = httpx.URL(args.url)
        self._check_allowed(url)
        timeout = self._options.timeout_s
        try:
            # httpx's timeout applies to each read; this one bounds the whole exchange (redirects, slowly dripping
            # bodies and name resolution included).
            async with asyncio.timeout(timeout):
                return await self._follow(args, url)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ToolError(f"{args.method} {url.host} timed out after {timeout:g} s", retryable=True) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise ToolError(f"{args.method} {url.host} failed: {_describe(exc)}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise ToolError(f"{args.method} {url.host} failed: {_describe(exc)}") from exc

    async def _follow(self, args: RequestInput, url: httpx.URL) -> JSON:
        """Send, and follow redirects hop by hop: each new URL must be http(s), on the allow-list and resolve to
        allowed addresses. 303 (and 301/302 after POST) turn into GET without the body, as browsers do;
        credentials are not sent to another origin."""
        method, body, headers = args.method, args.json_body, self._headers(args)
        hops = 0
        while True:
            with connect_only_to(url, await self._checked_addresses(url)):
                request = self._client.build_request(method, url, headers=headers, json=body)
                response = await self._client.send(request, stream=True)
            try:
                location = response.headers.get("location")
                if not (response.is_redirect and location and self._options.follow_redirects):
                    return await self._answer(response, url)
                if hops == self._options.follow_redirects:
                    raise ToolError(f"more than {hops} redirect(s); last one to {location[:200]}")
                target = _redirect_target(url, location)
                self._check_allowed(target, "redirect to host")
            finally:
                await response.aclose()
            if response.status_code == 303 or (response.status_code in (301, 302) and method == "POST"):
                method, body = "GET", None
            if (target.scheme, target.host, target.port) != (url.scheme, url.host, url.port):
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            url, hops = target, hops + 1

    async def _answer(self, response: httpx.Response, url: httpx.URL) -> JSON:
        if response.status_code >= 500:
            raise ToolError(f"upstream returned {response.status_code}", retryable=True)
        data, truncated = await read_capped(response, self._options.max_response_bytes)
        body = await shown(response.headers.get("content-type", ""), data, truncated)
        return {
            "status": response.status_code,
            "url": str(url),
            "headers": {k: response.headers[k] for k in _SHOWN_HEADERS if k in response.headers},
            "body": body,
            "truncated": truncated,
        }


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _redirect_target(url: httpx.URL, location: str) -> httpx.URL:
    try:
        target = url.join(location)
    except httpx.InvalidURL as exc:
        raise ToolError(f"redirect to an invalid URL {location[:200]!r}: {exc}") from exc
    if target.scheme not in DEFAULT_PORTS or not target.host:
        raise ToolError(f"redirect to {location[:200]!r} refused: only http:// and https:// URLs are followed")
    return target


def create(config: ToolConfig) -> HttpRequest:
    return HttpRequest(config)
