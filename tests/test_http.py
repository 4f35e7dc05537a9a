"""The HTTP face against a real server (127.0.0.1:0) and a real HTTP client: SSE framing, resuming with
Last-Event-ID, one run seen through both faces, errors, auth and rights, heartbeats and CORS."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import json_format
from test_auth import SLOW, Pki, as_caller, code_of, mtls_config, two_token_callers

from agent.v1 import agent_pb2 as pb
from conftest import stub
from service import tally, telemetry
from service.errors import RunInterrupted
from service.http.status import HTTP_STATUS, http_status
from service.rpc.server import Service
from service.run import Run

SLOW_TEXT = [{"text": "one two three four five six seven eight nine ten eleven twelve"}]
PACED = {"model": {"pacing": {"first_token_ms": 0, "token_interval_ms": 20}}}


@dataclass
class Sse:
    """One event of a stream as the wire had it, or a comment (`comment` set, the rest empty)."""

    id: str = ""
    event: str = ""
    data: str = ""
    comment: str | None = None
    fields: list[str] = field(default_factory=list)

    def message(self) -> pb.AgentEvent:
        return json_format.Parse(self.data, pb.AgentEvent())


async def sse_events(response: httpx.Response) -> AsyncIterator[Sse]:
    """The stream's events and comments, parsed line by line as the SSE spec says (no library: the framing is what
    is tested)."""
    current = Sse()
    async for line in response.aiter_lines():
        if line == "":
            if current.fields:
                yield current
            current = Sse()
        elif line.startswith(":"):
            yield Sse(comment=line[1:].strip())
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            current.fields.append(name)
            setattr(current, name, getattr(current, name) + value)


def client(svc: Service, **kw: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10, **kw)


async def start_http(start_service: Any, turns: Any = None, **config: Any) -> Service:
    return await start_service(turns, http_listen="127.0.0.1:0", **config)


async def stream_all(http: httpx.AsyncClient, method: str, url: str, **kw: Any) -> list[Sse]:
    async with http.stream(method, url, **kw) as response:
        assert response.status_code == 200, await response.aread()
        return [e async for e in sse_events(response) if e.comment is None]


async def test_a_run_streams_as_server_sent_events_one_per_event(start_service: Any, channel_to: Any) -> None:
    svc = await start_http(start_service)
    async with client(svc) as http, http.stream("POST", "/v1/runs:stream", json={"message": "hi"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-accel-buffering"] == "no"
        events = [e async for e in sse_events(response)]
    assert all(e.fields == ["id", "event", "data"] for e in events)  # and no comment: the run was quick
    messages = [e.message() for e in events]
    assert [e.id for e in events] == [str(n) for n in range(1, len(events) + 1)]
    assert [e.event for e in events] == [m.WhichOneof("event") for m in messages]
    assert events[0].event == "run_started" and events[-1].event == "final_response"
    assert "tool_call" in {e.event for e in events} and "text_delta" in {e.event for e in events}
    # the very events the gRPC face sends for the run
    run_id = messages[0].run_id
    watched = [e async for e in stub(channel_to(svc)).WatchRun(pb.WatchRunRequest(run_id=run_id))]
    assert messages == watched


async def test_resuming_with_last_event_id_mid_run_loses_and_repeats_nothing(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW_TEXT, **PACED)
    async with client(svc) as http:
        first: list[Sse] = []
        request = {"message": "hi", "onDisconnect": "CONTINUE"}  # the run outlives this first stream
        async with http.stream("POST", "/v1/runs:stream", json=request) as response:
            async for event in sse_events(response):
                first.append(event)
                if len(first) == 4:
                    break  # the connection drops mid-run
        run_id = first[0].message().run_id
        assert not svc.registry.get(run_id).finished
        rest = await stream_all(http, "GET", f"/v1/runs/{run_id}/events", headers={"last-event-id": first[-1].id})
        by_query = await stream_all(http, "GET", f"/v1/runs/{run_id}/events?after_seq=2")
    seqs = [int(e.id) for e in first + rest]
    assert seqs == list(range(1, len(seqs) + 1)) and rest[-1].event == "final_response"
    assert [int(e.id) for e in by_query] == seqs[2:]


async def test_a_coalesced_delivery_keeps_its_seq_range(start_service: Any) -> None:
    runs = {"subscriber_coalesce_lag": 1, "coalesce_window_s": 0}  # deltas logged one by one, replayed merged
    svc = await start_http(start_service, SLOW_TEXT, runs=runs)
    async with client(svc) as http:
        started = await http.post("/v1/runs", json={"message": "hi"})
        run_id = started.json()["runId"]
        await svc.registry.get(run_id).ended()
        events = await stream_all(http, "GET", f"/v1/runs/{run_id}/events")
    # an ended run's deltas replay merged: each delivery says the seqs it covers, and `id` is the last of them
    merged = [e.message() for e in events if e.message().first_seq]
    assert merged and all(m.first_seq < m.seq for m in merged)
    covered = [s for e in events for s in range(e.message().first_seq or int(e.id), int(e.id) + 1)]
    assert covered == list(range(1, len(covered) + 1))


async def test_a_run_started_over_grpc_is_watched_over_http_and_the_other_way(
    start_service: Any, channel_to: Any
) -> None:
    svc = await start_http(start_service, SLOW_TEXT, **PACED)
    api = stub(channel_to(svc))
    async with client(svc) as http:
        call = api.RunAgent(pb.RunAgentRequest(message="hi"))
        first = await call.read()
        over_http = await stream_all(http, "GET", f"/v1/runs/{first.run_id}/events")
        over_grpc = [first]
        while (message := await call.read()) != grpc.aio.EOF:
            over_grpc.append(message)
        assert [e.message() for e in over_http] == over_grpc

        submitted = (await http.post("/v1/runs", json={"message": "hi"})).json()
        watched = [e async for e in api.WatchRun(pb.WatchRunRequest(run_id=submitted["runId"]))]
        assert watched[0].run_started.model and watched[-1].WhichOneof("event") == "final_response"
        got = (await http.get(f"/v1/runs/{submitted['runId']}")).json()
        assert got["runId"] == submitted["runId"] and got["state"] == "SUCCEEDED"


async def test_errors_are_json_with_the_status_of_their_grpc_code(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http:
        cases = [
            (http.post("/v1/runs:stream", json={"message": " "}), 400, "INVALID_ARGUMENT"),
            (http.post("/v1/runs:stream", content=b"{not json"), 400, "INVALID_ARGUMENT"),
            (http.post("/v1/runs", json={"message": "hi", "tools": ["nope"]}), 400, "INVALID_ARGUMENT"),
            (http.get("/v1/runs/run_000/events"), 404, "NOT_FOUND"),
            (http.get("/v1/runs/run_000"), 404, "NOT_FOUND"),
            (http.post("/v1/runs/run_000:cancel"), 404, "NOT_FOUND"),
            (http.post("/v1/runs:stream", json={"message": "hi"}, headers={"request-timeout": "soon"}), 400, None),
        ]
        for request, status, code in cases:
            response = await request
            body = response.json()
            assert response.status_code == status, body
            assert body["code"] == (code or "INVALID_ARGUMENT") and body["message"]
            assert body["details"][0]["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"
            assert body["details"][0]["domain"] == "agent.v1"
        run_id = (await http.post("/v1/runs", json={"message": "hi"})).json()["runId"]
        past = await http.get(f"/v1/runs/{run_id}/events", headers={"last-event-id": "99"})
        assert (past.status_code, past.json()["code"]) == (400, "OUT_OF_RANGE")
        cancelled = await http.post(f"/v1/runs/{run_id}:cancel")
        assert cancelled.status_code == 200 and cancelled.json()["state"] == "CANCELLED"
        again = await http.post(f"/v1/runs/{run_id}:cancel", json={"mode": "AFTER_TURN"})
        assert again.json()["state"] == "CANCELLED"  # idempotent, as over gRPC
        assert (await http.get("/v1/nothing")).status_code == 404


async def test_callers_authenticate_with_bearer_tokens_and_keep_to_their_rights(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW, **two_token_callers(tools=["echo", "sleep"]))
    a, b = (dict(as_caller(name)) for name in ("a", "b"))
    async with client(svc) as http:
        refused = await http.get("/v1/tools")
        assert (refused.status_code, refused.json()["code"]) == (401, "UNAUTHENTICATED")
        wrong = await http.get("/v1/tools", headers={"authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "not valid" in wrong.json()["message"]
        tools = (await http.get("/v1/tools", headers=a)).json()["tools"]
        assert sorted(t["name"] for t in tools) == ["echo", "sleep"] and tools[0]["inputSchema"]
        denied = await http.post("/v1/runs", json={"message": "hi", "tools": ["fail"]}, headers=a)
        assert (denied.status_code, denied.json()["code"]) == (403, "PERMISSION_DENIED")
        run_id = (await http.post("/v1/runs", json={"message": "hi"}, headers=a)).json()["runId"]
        # b cannot see, watch or cancel a's run: not found, as an unknown one
        for response in (
            await http.get(f"/v1/runs/{run_id}", headers=b),
            await http.get(f"/v1/runs/{run_id}/events", headers=b),
            await http.post(f"/v1/runs/{run_id}:cancel", headers=b),
        ):
            assert response.status_code == 404
        assert (await http.post(f"/v1/runs/{run_id}:cancel", headers=a)).status_code == 200


async def test_a_quiet_stream_carries_heartbeat_comments(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW, http={"heartbeat_s": 0.05})
    async with client(svc) as http, http.stream("POST", "/v1/runs:stream", json={"message": "hi"}) as response:
        seen: list[Sse] = []
        async for event in sse_events(response):
            seen.append(event)
            if sum(e.comment is not None for e in seen) == 2:
                break
    kinds = [e.event or f": {e.comment}" for e in seen]
    assert kinds[-2:] == [": keep-alive", ": keep-alive"] and "tool_call" in kinds


async def test_leaving_a_stream_cancels_the_run_it_started(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http, http.stream("POST", "/v1/runs:stream", json={"message": "hi"}) as response:
        run_id = response.headers["x-run-id"]
    run = svc.registry.get(run_id)
    async with asyncio.timeout(5):
        await run.ended()
    assert run.state.value == "cancelled"


async def test_cors_answers_only_the_listed_origins(start_service: Any) -> None:
    preflight = {"origin": "https://ops.example.com", "access-control-request-method": "POST"}
    closed = await start_http(start_service)
    async with client(closed) as http:
        response = await http.options("/v1/runs:stream", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    svc = await start_http(start_service, http={"cors_origins": ["https://ops.example.com"]})
    async with client(svc) as http:
        response = await http.options("/v1/runs:stream", headers=preflight)
        assert response.headers["access-control-allow-origin"] == "https://ops.example.com"
        other = await http.get("/v1/tools", headers={"origin": "https://evil.example.com"})
        assert other.status_code == 200 and "access-control-allow-origin" not in other.headers


async def test_the_request_timeout_header_bounds_the_run(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http:
        events = await stream_all(
            http, "POST", "/v1/runs:stream", json={"message": "hi"}, headers={"request-timeout": "0.5"}
        )
    error = events[-1].message().error
    assert events[-1].event == "error" and error.code == "DEADLINE_EXCEEDED"


def test_event_data_is_one_line_of_json() -> None:
    assert "\n" not in json.dumps({"text": "a\nb"})  # the framing relies on it: a newline would end `data:`


@pytest.mark.parametrize("value", ["0", "-1", "nan"])
async def test_a_bad_timeout_is_refused(start_service: Any, value: str) -> None:
    svc = await start_http(start_service)
    async with client(svc) as http:
        response = await http.get("/v1/tools", headers={"x-request-timeout": value})
    assert response.status_code == 400 and "x-request-timeout" in response.json()["message"]


def test_every_grpc_code_has_its_http_status() -> None:
    codes = [code.name for code in grpc.StatusCode]
    assert sorted(HTTP_STATUS) == sorted(codes)
    assert all(http_status(c) != 500 for c in codes if c not in ("UNKNOWN", "INTERNAL", "DATA_LOSS"))


@pytest.fixture
def certs(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_client(svc: Service, pki: Pki, identity: str | None = None, *, rogue: bool = False) -> httpx.AsyncClient:
    context = ssl.create_default_context()
    pki.ca.configure_trust(context)
    if identity is not None:
        (pki.other_ca if rogue else pki.ca).issue_cert(identity, common_name=identity).configure_cert(context)
    return httpx.AsyncClient(base_url=f"https://localhost:{svc.http_port}", verify=context, timeout=10)


async def test_mtls_identifies_the_caller_over_http_too(start_service: Any, certs: Pki) -> None:
    pki = certs
    svc = await start_http(start_service, **mtls_config(pki))
    async with tls_client(svc, pki, "risk.callers.internal") as http:
        events = await stream_all(http, "POST", "/v1/runs:stream", json={"message": "hi"})
    run = svc.registry.get(events[0].message().run_id)
    assert run.caller == "risk-engine" and run.spec.metadata["caller"] == "risk-engine"  # as audit records it
    async with tls_client(svc, pki, "audit.callers.internal") as http:  # the auditor's rights: echo and sleep
        assert (await http.post("/v1/runs", json={"message": "hi", "tools": ["fail"]})).status_code == 403
    for identity in (None, "stranger.callers.internal"):  # no certificate (a browser), or nobody configured
        async with tls_client(svc, pki, identity) as http:
            response = await http.get("/v1/tools")
            assert (response.status_code, response.json()["code"]) == (401, "UNAUTHENTICATED"), identity
    async with tls_client(svc, pki, "risk.callers.internal", rogue=True) as http:
        with pytest.raises(httpx.HTTPError):  # a certificate is verified when one is presented
            await http.get("/v1/tools")


async def test_a_callers_traceparent_is_the_parent_of_the_run(start_service: Any, spans: Any) -> None:
    svc = await start_http(start_service)
    trace_id, parent_id = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    async with client(svc) as http:
        headers = {"traceparent": f"00-{trace_id}-{parent_id}-01"}
        await stream_all(http, "POST", "/v1/runs:stream", json={"message": "hi"}, headers=headers)
    finished = spans.get_finished_spans()
    server = next(s for s in finished if s.name == "POST /v1/runs:stream")
    run = next(s for s in finished if s.name == "run")
    assert format(server.context.trace_id, "032x") == trace_id and format(server.parent.span_id, "016x") == parent_id
    assert run.context.trace_id == server.context.trace_id and run.parent.span_id == server.context.span_id


async def test_requests_are_counted_by_route_and_status(start_service: Any) -> None:
    svc = await start_http(start_service)
    before = telemetry.HTTP_REQUESTS.labels("/v1/runs/{run_id}", "404")._value.get()
    async with client(svc) as http:
        await http.get("/v1/runs/run_nope")
    assert telemetry.HTTP_REQUESTS.labels("/v1/runs/{run_id}", "404")._value.get() == before + 1


async def test_a_drain_ends_open_streams_with_the_runs_error_and_refuses_new_runs(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http, http.stream("POST", "/v1/runs:stream", json={"message": "hi"}) as response:
        events = sse_events(response)
        async for event in events:
            if event.event == "tool_call":
                break
        svc.servicer.api.draining = True
        refused = await http.post("/v1/runs", json={"message": "hi"})
        assert (refused.status_code, refused.json()["code"]) == (503, "UNAVAILABLE")
        drained = asyncio.create_task(svc.drain(grace=0))
        rest = [e async for e in events if e.comment is None]
        await drained
    assert rest[-1].event == "error" and rest[-1].message().error.code == "UNAVAILABLE"


async def test_a_callers_limits_hold_over_http_as_over_grpc(start_service: Any, channel_to: Any) -> None:
    svc = await start_http(start_service, SLOW, **two_token_callers(max_concurrent_runs=1))
    async with client(svc) as http:
        first = await http.post("/v1/runs", json={"message": "hi"}, headers=dict(as_caller("a")))
        assert first.status_code == 200
        # the one run a may have, started over HTTP, counts over gRPC too, and the other way round
        code = await code_of(stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="hi"), metadata=as_caller("a")))
        assert code[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
        second = await http.post("/v1/runs:stream", json={"message": "hi"}, headers=dict(as_caller("a")))
        assert (second.status_code, second.json()["code"]) == (429, "RESOURCE_EXHAUSTED")
        await http.post(f"/v1/runs/{first.json()['runId']}:cancel", headers=dict(as_caller("a")))


async def test_a_bug_is_answered_as_internal_json_and_logged(
    start_service: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await start_http(start_service)

    def broken(caller: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(svc.servicer.api, "list_tools", broken)
    async with client(svc) as http:
        response = await http.get("/v1/tools")
    assert (response.status_code, response.json()["code"]) == (500, "INTERNAL")
    assert "a bug" not in response.text and any(r.getMessage() == "http request failed" for r in caplog.records)


async def test_the_request_timeout_ends_a_watch_but_not_the_run(start_service: Any) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http:
        run_id = (await http.post("/v1/runs", json={"message": "hi"})).json()["runId"]
        headers = {"request-timeout": "0.3"}
        async with http.stream("GET", f"/v1/runs/{run_id}/events", headers=headers) as response:
            seen = [e async for e in sse_events(response)]
        assert seen[-1].comment == "request timeout" and seen[0].event == "run_started"
        assert not svc.registry.get(run_id).finished
        await http.post(f"/v1/runs/{run_id}:cancel")


def test_a_service_without_http_listen_loads_no_http_stack() -> None:
    stack = "('starlette', 'uvicorn', 'httptools')"
    probe = f"import sys, service.wiring; print(sorted(m for m in sys.modules if m.split('.')[0] in {stack}))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]"


async def test_events_sent_over_http_are_counted_by_kind(start_service: Any) -> None:
    def sent(kind: str) -> float:
        tally.flush()  # what a scrape does first
        return telemetry.EVENTS.labels(kind)._value.get()  # type: ignore[no-any-return]

    svc = await start_http(start_service)
    before = sent("run_started"), sent("final_response")
    async with client(svc) as http:
        events = await stream_all(http, "POST", "/v1/runs:stream", json={"message": "hi"})
    assert events[0].event == "run_started" and events[-1].event == "final_response"
    assert (sent("run_started"), sent("final_response")) == (before[0] + 1, before[1] + 1)


async def test_unknown_paths_wrong_methods_and_missing_files_are_refused_as_json(start_service: Any) -> None:
    svc = await start_http(start_service)
    async with client(svc) as http:
        cases = [
            (http.get("/v1/nope"), 404, "NOT_FOUND", None),
            (http.get("/static/nope.js"), 404, "NOT_FOUND", None),
            (http.get("/static/"), 404, "NOT_FOUND", None),
            (http.delete("/v1/runs"), 405, "UNIMPLEMENTED", "GET, HEAD, POST"),
            (http.get("/v1/runs:stream"), 405, "UNIMPLEMENTED", "POST"),
            # not GetRun of a run called "run_x:cancel"
            (http.get("/v1/runs/run_x:cancel"), 405, "UNIMPLEMENTED", "POST"),
            (http.put("/v1/tools"), 405, "UNIMPLEMENTED", "GET, HEAD"),
        ]
        for request, status, code, allow in cases:
            response = await request
            assert (response.status_code, response.json()["code"]) == (status, code), response.text
            assert response.json()["message"] and response.headers.get("allow") == allow
            (info,) = response.json()["details"]  # as the gRPC face's ErrorInfo (it was [] for a wrong method)
            assert info["reason"] == ("NO_SUCH_PATH" if status == 404 else "WRONG_METHOD"), info
            assert (info["domain"], info["metadata"]) == ("agent.v1", {"retryable": "false"})
        big = await http.post("/v1/runs:stream", content=b"{" + b" " * (4 * 1024 * 1024) + b"}")
        assert (big.status_code, big.json()["code"]) == (413, "RESOURCE_EXHAUSTED")  # as gRPC says it, as HTTP does
        assert big.json()["details"][0]["reason"] == "REQUEST_TOO_LARGE" and "4194304" in big.json()["message"]
        paged = await http.get("/v1/runs", params={"page_size": "abc"})
        assert paged.status_code == 400 and "invalid literal" not in paged.json()["message"]
        assert (await http.head("/v1/tools")).status_code == 200


def _interrupted_after(entries: int) -> Any:
    """`Run.follow` that stops after `entries` entries as a mirrored run does when its driver's replica died."""
    original = Run.follow

    def follow(self: Run, *args: Any, **kwargs: Any) -> Any:
        async def entries_then_interrupted() -> AsyncIterator[Any]:
            sent = 0
            async for entry in original(self, *args, **kwargs):
                if sent == entries:
                    break
                sent += 1
                yield entry
            raise RunInterrupted(f"run {self.id} stopped: its replica stopped renewing its lease")

        return entries_then_interrupted()

    return follow


async def test_a_stream_that_cannot_go_on_says_why_and_ends_cleanly(
    start_service: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc = await start_http(start_service, SLOW)
    async with client(svc) as http:
        run_id = (await http.post("/v1/runs", json={"message": "hi"})).json()["runId"]
        monkeypatch.setattr(Run, "follow", _interrupted_after(1))
        async with http.stream("GET", f"/v1/runs/{run_id}/events") as response:
            assert response.status_code == 200
            seen = [e async for e in sse_events(response)]  # a cut body would raise here
        assert seen[0].event == "run_started"
        assert seen[-1].comment == f"UNAVAILABLE: run {run_id} stopped: its replica stopped renewing its lease"
        monkeypatch.setattr(Run, "follow", _interrupted_after(0))
        refused = await http.get(f"/v1/runs/{run_id}/events")  # nothing sent yet: the error's own status
        assert (refused.status_code, refused.json()["code"]) == (503, "UNAVAILABLE")
        assert refused.json()["details"][0]["reason"] == "RUN_INTERRUPTED"
        await http.post(f"/v1/runs/{run_id}:cancel")
