"""What callers who never read the code sent, found by calling a real server with grpcurl and curl, and what they
get now: a clear refusal with the right status, never UNKNOWN or INTERNAL for their mistake, nor a crash later."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import logging
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import trustme
from backends import PostgresSchema, audit_key_file
from cryptography.hazmat.primitives import serialization
from pydantic import ValidationError
from test_auth import Pki
from test_interact import TWO_SLEEPS

from agent.v1 import agent_pb2 as pb
from conftest import make_config, stub
from service.listing import encode_token


def forged(text: str) -> str:
    """A page token of the form the server gives, naming what it never would."""
    return "v1." + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


async def refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await call
    return err.value


async def test_a_bug_in_a_handler_ends_the_call_with_internal_not_unknown(
    start_service: Any, channel_to: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    svc = await start_service()
    api = stub(channel_to(svc))

    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(svc.registry, "list_runs", broken)
    monkeypatch.setattr(svc.registry, "watch", broken)
    unary = await refused(api.ListRuns(pb.ListRunsRequest()))
    streamed = await refused(api.WatchRun(pb.WatchRunRequest(run_id="run_x")).read())
    for err in (unary, streamed):
        # grpc's own answer was UNKNOWN, "Unexpected <class 'RuntimeError'>: a bug"
        assert err.code() == grpc.StatusCode.INTERNAL, err
        assert "a bug" in err.details() and "RuntimeError" not in err.details()
    logged = [r for r in caplog.records if r.getMessage() == "call failed: a bug"]
    assert len(logged) == 2 and all(r.exc_info and r.levelno == logging.ERROR for r in logged)


@pytest.mark.parametrize(
    "token",
    [
        forged(f"{2**64}:run_x"),  # SQLite: OverflowError, the call ended UNKNOWN
        forged("-5:run_x"),
        forged("12:run_\x00x"),  # PostgreSQL refuses a NUL in text
    ],
)
async def test_a_forged_page_token_is_refused_before_the_stores_see_it(
    start_service: Any, channel_to: Any, token: str
) -> None:
    svc = await start_service(runs={"keep_summaries": True})  # the SQLite summaries answer ListRuns too
    api = stub(channel_to(svc))
    await api.RunAgentUnary(pb.RunAgentRequest(message="hi"))
    err = await refused(api.ListRuns(pb.ListRunsRequest(page_token=token)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "page_token is not one this server gave" in err.details()
    real = encode_token((1, "run_0123456789abcdef01234567"))  # a real token still pages
    assert not (await api.ListRuns(pb.ListRunsRequest(page_token=real))).runs


async def test_a_run_id_with_a_nul_is_invalid_argument_on_postgres_records(
    postgres_schema: PostgresSchema, start_service: Any, channel_to: Any, tmp_path: Path
) -> None:
    svc = await start_service(records={"url": postgres_schema.url}, audit={"key_file": audit_key_file(tmp_path)})
    api = stub(channel_to(svc))
    bad = "run_\x00x"
    calls = {  # GetRun and CancelRun reached PostgreSQL's summaries and ended UNKNOWN (psycopg's DataError)
        "GetRun": api.GetRun(pb.GetRunRequest(run_id=bad)),
        "CancelRun": api.CancelRun(pb.CancelRunRequest(run_id=bad)),
        "WatchRun": api.WatchRun(pb.WatchRunRequest(run_id=bad)).read(),
        "SendInput": api.SendInput(pb.SendInputRequest(run_id=bad, text="hi")),
        "ListRuns": api.ListRuns(pb.ListRunsRequest(page_token=forged("12:run_\x00x"))),
    }
    for name, call in calls.items():
        err = await refused(call)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (name, err)


async def test_interact_cancel_run_without_a_mode_cancels_at_once_as_cancel_run_does(
    start_service: Any, channel_to: Any
) -> None:
    svc = await start_service(TWO_SLEEPS)
    call = stub(channel_to(svc)).Interact()
    await call.write(pb.ClientMessage(start=pb.RunAgentRequest(message="go", tools=["sleep", "echo"])))
    await asyncio.wait_for(svc.tools["sleep"].running.wait(), 5)
    await call.write(pb.ClientMessage(cancel_run=pb.CancelRunRequest()))  # was INVALID_ARGUMENT "unknown mode 0"
    events = [event async for event in _until_end(call)]
    assert await call.code() == grpc.StatusCode.CANCELLED
    assert events[-1].error.code == "CANCELLED"


async def _until_end(call: Any) -> Any:
    try:
        while (event := await call.read()) is not grpc.aio.EOF:
            yield event
    except grpc.aio.AioRpcError:
        return


@pytest.mark.parametrize("url", ["https://1.1.1.1:99999/hook", "https://1.1.1.1:0/hook"])
async def test_a_callback_url_with_a_port_no_socket_has_is_refused(
    start_service: Any, channel_to: Any, url: str
) -> None:
    """Taken before, it failed every delivery try with an OverflowError ("callback try not recorded") until expiry."""
    svc = await start_service()
    err = await refused(
        stub(channel_to(svc)).SubmitRun(pb.RunAgentRequest(message="hi", callback=pb.Callback(url=url)))
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "port must be from 1 to 65535" in err.details()
    assert not svc.registry.runs


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b'{"message": "caf\xe9"}', "not UTF-8"),  # was 500 INTERNAL
        (b"[]", "must be a JSON object"),  # was taken as {}: "message must not be empty"
        (b'"message"', "must be a JSON object"),  # was "no field named m"
        (b"null", "must be a JSON object"),
    ],
)
async def test_an_http_body_that_is_no_json_object_is_a_400(start_service: Any, body: bytes, says: str) -> None:
    svc = await start_service(http_listen="127.0.0.1:0")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        for route in ("/v1/runs", "/v1/runs:stream"):
            answer = await http.post(route, content=body)
            assert answer.status_code == 400, (route, answer.text)
            assert answer.json()["code"] == "INVALID_ARGUMENT" and says in answer.json()["message"]
    assert not svc.registry.runs


async def test_listing_another_callers_runs_is_refused_with_its_own_reason(start_service: Any) -> None:
    svc = await start_service(http_listen="127.0.0.1:0")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        answer = await http.get("/v1/runs", params={"caller": "someone-else"})
    assert answer.status_code == 403 and answer.json()["code"] == "PERMISSION_DENIED"
    # was TOOL_NOT_PERMITTED, the reason of a request naming a tool outside the caller's rights
    assert answer.json()["details"][0]["reason"] == "LISTING_NOT_PERMITTED"


@pytest.mark.parametrize("wrong", ["swapped", "not_pem", "encrypted_key", "ca_not_pem"])
async def test_tls_files_that_cannot_serve_stop_the_start_naming_them(
    start_service: Any, tmp_path: Path, wrong: str
) -> None:
    """grpc only fails to add the port, which the start reported as "the port is in use, or the address is not this
    host's"."""
    pki = Pki(tmp_path)
    tls = {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)}
    if wrong == "swapped":
        tls = {"cert_file": tls["key_file"], "key_file": tls["cert_file"]}
    elif wrong == "not_pem":
        (tmp_path / "notes.txt").write_text("not a certificate\n")
        tls["cert_file"] = str(tmp_path / "notes.txt")
    elif wrong == "encrypted_key":
        key = trustme.CA().issue_cert("localhost").private_key_pem.bytes()
        loaded = serialization.load_pem_private_key(key, password=None)
        encrypted = loaded.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"pass phrase"),
        )
        (tmp_path / "encrypted.key").write_bytes(encrypted)
        tls["key_file"] = str(tmp_path / "encrypted.key")
    else:
        (tmp_path / "ca.txt").write_text("not a certificate\n")
        tls["client_ca_file"] = str(tmp_path / "ca.txt")
    with pytest.raises(OSError) as refused:
        await start_service(tls=tls)
    said = str(refused.value)
    assert ("tls.client_ca_file" if wrong == "ca_not_pem" else "tls.cert_file") in said, said
    assert "port is in use" not in said


async def test_a_page_on_a_listed_origin_may_read_the_streams_run_id(start_service: Any) -> None:
    svc = await start_service(http_listen="127.0.0.1:0", http={"cors_origins": ["http://app.example"]})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        headers = {"origin": "http://app.example"}
        async with http.stream("POST", "/v1/runs:stream", json={"message": "hi"}, headers=headers) as answer:
            assert answer.headers["access-control-allow-origin"] == "http://app.example"
            # without it a browser hides X-Run-Id from the page's script
            assert "x-run-id" in answer.headers["access-control-expose-headers"].lower()
            assert answer.headers["x-run-id"].startswith("run_")
            await answer.aread()


@pytest.mark.parametrize("listen", ["unix:", "unix://", "unix-abstract:"])
def test_a_unix_listen_address_without_a_path_is_refused(tmp_path: Path, listen: str) -> None:
    with pytest.raises(ValidationError) as refused:  # grpc served on it, on no socket a client could find
        make_config(tmp_path, listen=listen)
    assert "names no socket: unix:PATH" in str(refused.value)


async def test_a_unix_socket_in_a_missing_folder_is_not_called_a_port_in_use(
    start_service: Any, tmp_path: Path
) -> None:
    with pytest.raises(OSError) as refused:
        await start_service(listen=f"unix:{tmp_path}/missing/agent.sock")
    assert "the socket's folder is missing" in str(refused.value), refused.value


async def test_interact_calls_cut_by_their_clients_leave_no_task_behind(start_service: Any, channel_to: Any) -> None:
    """Each cut call left a task waiting on its refusal queue forever (until the collector found the cycle)."""

    def waiting_on_a_queue() -> int:
        return sum(1 for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "Queue.get")  # type: ignore[union-attr]

    svc = await start_service(TWO_SLEEPS)
    before = waiting_on_a_queue()
    gc.disable()  # the leak must not depend on when the collector runs
    try:
        calls = []
        for _ in range(5):
            call = stub(channel_to(svc)).Interact()
            await call.write(pb.ClientMessage(start=pb.RunAgentRequest(message="go", tools=["sleep", "echo"])))
            calls.append((call, (await call.read()).run_id))
        for call, run_id in calls:
            call.cancel()
            await asyncio.wait_for(svc.registry.runs[run_id].ended(), 5)
        for _ in range(500):
            if waiting_on_a_queue() == before:
                break
            await asyncio.sleep(0.01)
        assert waiting_on_a_queue() == before
    finally:
        gc.enable()


async def test_an_http_body_with_a_byte_order_mark_is_taken(start_service: Any) -> None:
    svc = await start_service(http_listen="127.0.0.1:0")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        answer = await http.post("/v1/runs", content='\ufeff{"message": "hi"}'.encode())
    assert answer.status_code == 200, answer.text


@pytest.mark.parametrize("first_valid", [False, True])
async def test_interact_bytes_that_are_no_client_message_are_invalid_argument(
    start_service: Any, channel_to: Any, first_valid: bool
) -> None:
    """The unary calls had this (interceptors.RejectUndecodable); Interact ended UNKNOWN, "Unexpected DecodeError"."""
    svc = await start_service(TWO_SLEEPS)
    raw = channel_to(svc).stream_stream(
        "/agent.v1.AgentService/Interact", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    call = raw()
    if first_valid:
        start = pb.ClientMessage(start=pb.RunAgentRequest(message="go", tools=["sleep", "echo"]))
        await call.write(start.SerializeToString())
        await call.read()  # run_started
    await call.write(b"\xff\xff\xff\xff")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        while await call.read() is not grpc.aio.EOF:
            pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value
    assert "not a valid agent.v1.ClientMessage" in err.value.details()


async def test_http_max_streams_serves_that_many_connections_at_once(start_service: Any) -> None:
    svc = await start_service(TWO_SLEEPS, http_listen="127.0.0.1:0", http={"max_streams": 2})
    base = f"http://127.0.0.1:{svc.http_port}"
    request = {"message": "go", "tools": ["sleep", "echo"]}
    async with contextlib.AsyncExitStack() as held:
        lines = []  # held, or the collector's closing of a dropped iterator closes its stream
        for _ in range(2):  # uvicorn counted the connection asking among the open ones: the second got 503
            http = await held.enter_async_context(httpx.AsyncClient(base_url=base, timeout=10))
            answer = await held.enter_async_context(http.stream("POST", "/v1/runs:stream", json=request))
            assert answer.status_code == 200
            lines.append(answer.aiter_lines())
            await anext(lines[-1])
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            assert (await http.get("/v1/tools")).status_code == 503  # the third connection
    async with httpx.AsyncClient(base_url=base, timeout=10) as http:
        assert (await http.get("/v1/tools")).status_code == 200  # the two are closed


async def test_http_headers_past_max_header_bytes_get_431(start_service: Any) -> None:
    """httptools reads a head of any size (a 20 MB header was taken whole): memory at a client's will."""
    svc = await start_service(http_listen="127.0.0.1:0", limits={"max_header_bytes": 4096})
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{svc.http_port}", timeout=10) as http:
        answer = await http.get("/v1/tools", headers={"x-big": "a" * 100_000})
        assert answer.status_code == 431 and answer.json()["code"] == "RESOURCE_EXHAUSTED"
        assert answer.json()["details"][0]["reason"] == "HEADERS_TOO_LARGE"  # the body every refusal has
        big_body = {"message": "hi", "system": "s" * 60_000}  # a large body is no large head
        assert (await http.post("/v1/runs", json=big_body)).status_code == 200
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.http_port)
    try:  # a head sent in small pieces is counted across them
        writer.write(b"GET /v1/tools HTTP/1.1\r\nhost: x\r\n")
        for _ in range(5):  # past 4096 bytes with the last piece, and nothing written after it
            writer.write(b"x-piece: " + b"p" * 1000 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0)
        assert (await asyncio.wait_for(reader.read(100), 10)).startswith(b"HTTP/1.1 431")
    finally:
        writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", svc.http_port)
    try:  # two requests on one connection, each under the bound, the second after a body: both served
        body = b'{"message": "hi"}'
        post = b"POST /v1/runs HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
        writer.write(post + b"GET /v1/tools HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"p" * 3000 + b"\r\n\r\n")
        await writer.drain()
        seen = b""
        while seen.count(b"HTTP/1.1 200") < 2:
            chunk = await asyncio.wait_for(reader.read(65536), 10)
            assert chunk, seen[:300]
            seen += chunk
    finally:
        writer.close()
