"""http_request: GET or POST to hosts on a configured allow-list, with the response read in a streaming fashion
and capped in size. Redirects are returned, not followed, so a redirect can never leave the allow-list."""

from __future__ import annotations

import asyncio
import json
from typing import Any, ClassVar, Literal
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tools.base import JSON, Tool, ToolConfig, ToolError
from tools.policy import BreakerPolicy, RetryPolicy, TimeoutPolicy, ToolPolicy

_DEFAULT_PORTS = {"http": 80, "https": 443}
_SHOWN_HEADERS = ("content-type", "content-length", "location")
_TEXT_MARKERS = ("json", "xml", "javascript", "x-www-form-urlencoded", "yaml", "csv")


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", title="tools.http_request options")

    allow_hosts: list[str] = Field(
        default_factory=list, description="'host' (any port) or 'host:port'; empty allows nothing"
    )
    timeout_s: float = Field(10.0, gt=0, description="Limit for the whole request, body included")
    max_response_bytes: int = Field(1024 * 1024, ge=1, description="Longer bodies are cut and marked truncated")

    @field_validator("allow_hosts")
    @classmethod
    def _parse_hosts(cls, entries: list[str]) -> list[str]:
        for entry in entries:
            _parse_host_entry(entry)  # raises ValueError with the entry in the message
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
    method: Literal["GET", "POST"] = Field("GET", description="HTTP method.")
    url: str = Field(description="Absolute http:// or https:// URL; its host must be on the allow-list.")
    headers: dict[str, str] | None = Field(None, description="Extra request headers, e.g. Accept or Authorization.")
    json_body: Any = Field(None, description="JSON body to send; POST only.")

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        try:
            url = httpx.URL(value)
        except httpx.InvalidURL as exc:
            raise ValueError(f"invalid URL: {exc}") from exc
        if url.scheme not in _DEFAULT_PORTS or not url.host:
            raise ValueError("url must be an absolute http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _no_host_header(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        # Overriding Host would address another virtual host than the allow-listed one.
        if value and any(name.lower() == "host" for name in value):
            raise ValueError("the Host header is set from the url and cannot be overridden")
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
        "otherwise. 4xx answers come back as results to read; redirects are not followed (read `location` and "
        "request it yourself if its host is allowed); 5xx, timeouts and connection failures are errors."
    )
    Input: ClassVar[type[BaseModel]] = RequestInput
    # Upstreams blip: retry timeouts, 5xx and connection errors a couple of times, and stop calling one that is down.
    policy: ClassVar[ToolPolicy] = ToolPolicy(
        timeout=TimeoutPolicy(seconds=30),
        retry=RetryPolicy(attempts=3, initial_backoff_s=0.25, max_backoff_s=4),
        breaker=BreakerPolicy(failure_threshold=5, cooldown_s=30),
        slow_s=5,
    )

    def __init__(self, config: ToolConfig) -> None:
        self._options = Options.model_validate(dict(config.options))
        self._allowed = {_parse_host_entry(entry) for entry in self._options.allow_hosts}
        # trust_env=False: proxy variables from the environment must not route requests around the allow-list.
        self._client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=httpx.Timeout(self._options.timeout_s)
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _check_allowed(self, url: httpx.URL) -> None:
        host = url.host.lower()
        port = url.port or _DEFAULT_PORTS[url.scheme]
        if (host, None) in self._allowed or (host, port) in self._allowed:
            return
        shown = host if url.port is None else f"{host}:{port}"
        allowed = ", ".join(self._options.allow_hosts) or "nothing is allowed"
        raise ToolError(f"host {shown} is not on the allow-list (allowed: {allowed})")

    async def run(self, args: RequestInput) -> JSON:
        url = httpx.URL(args.url)
        self._check_allowed(url)
        timeout = self._options.timeout_s
        try:
            # httpx's timeout applies to each read; this one bounds the whole exchange (slowly dripping bodies).
            async with asyncio.timeout(timeout):
                return await self._send(args, url)
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise ToolError(f"{args.method} {url.host} timed out after {timeout:g} s", retryable=True) from exc
        except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
            raise ToolError(f"{args.method} {url.host} failed: {_describe(exc)}", retryable=True) from exc
        except httpx.HTTPError as exc:
            raise ToolError(f"{args.method} {url.host} failed: {_describe(exc)}") from exc

    async def _send(self, args: RequestInput, url: httpx.URL) -> JSON:
        request = self._client.build_request(args.method, url, headers=args.headers, json=args.json_body)
        response = await self._client.send(request, stream=True)
        try:
            if response.status_code >= 500:
                raise ToolError(f"upstream returned {response.status_code}", retryable=True)
            data, truncated = await self._read_capped(response)
        finally:
            await response.aclose()
        return {
            "status": response.status_code,
            "headers": {k: response.headers[k] for k in _SHOWN_HEADERS if k in response.headers},
            "body": _body(response, data, truncated),
            "truncated": truncated,
        }

    async def _read_capped(self, response: httpx.Response) -> tuple[bytes, bool]:
        cap = self._options.max_response_bytes
        chunks: list[bytes] = []
        size = 0
        async for chunk in response.aiter_bytes():
            if size + len(chunk) > cap:
                chunks.append(chunk[: cap - size])
                return b"".join(chunks), True
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks), False


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _body(response: httpx.Response, data: bytes, truncated: bool) -> JSON:
    media_type = response.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type and not media_type.startswith("text/") and not any(m in media_type for m in _TEXT_MARKERS):
        return f"<{len(data)} bytes of {media_type}, not shown>"
    try:
        text = data.decode(response.charset_encoding or "utf-8", errors="replace")
    except LookupError:  # an unknown charset name in the response
        text = data.decode("utf-8", errors="replace")
    if not truncated and (media_type == "application/json" or media_type.endswith("+json")):
        try:
            return json.loads(text)
        except ValueError:
            pass  # a server that says JSON but sends something else: show the text
    return text


def create(config: ToolConfig) -> HttpRequest:
    return HttpRequest(config)
