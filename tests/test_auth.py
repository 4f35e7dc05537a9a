"""Caller identity and rights over real TLS: client certificates (mutual TLS) and bearer tokens, per-caller tools
and limits, health without credentials. Certificates are made at test time with trustme."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import trustme
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agent.v1 import agent_pb2 as pb
from conftest import cli, make_config, stub
from service.callers import Caller, CallerLimits, token_hash
from service.config import AuthConfig, CallerConfig
from service.errors import Unauthenticated
from service.rpc.auth import Authenticator, AuthInterceptor

SLOW = [{"tool_calls": [{"name": "sleep", "input": {"seconds": 30}}]}, {"text": "never"}]


class Pki:
    def __init__(self, tmp: Path) -> None:
        self.ca = trustme.CA()
        self.other_ca = trustme.CA()
        server = self.ca.issue_cert("localhost", "127.0.0.1")
        self.cert_file, self.key_file, self.ca_file = tmp / "server.pem", tmp / "server.key", tmp / "ca.pem"
        server.cert_chain_pems[0].write_to_path(str(self.cert_file))
        server.private_key_pem.write_to_path(str(self.key_file))
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def channel(
        self,
        port: int,
        *,
        identity: str | None = None,
        rogue: bool = False,
        sans: tuple[str, ...] | None = None,
        **kw: Any,
    ) -> grpc.aio.Channel:
        """A channel with a client certificate whose CN is `identity`, and so are its SANs unless `sans` says."""
        key: dict[str, bytes] = {}
        if identity is not None:
            names = (identity,) if sans is None else sans
            cert = (self.other_ca if rogue else self.ca).issue_cert(*names, common_name=identity)
            key = {"private_key": cert.private_key_pem.bytes(), "certificate_chain": cert.cert_chain_pems[0].bytes()}
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca.cert_pem.bytes(), **key)
        return grpc.aio.secure_channel(f"localhost:{port}", creds, **kw)


@pytest.fixture
def pki(tmp_path: Path) -> Iterator[Pki]:
    yield Pki(tmp_path)


def mtls_config(pki: Pki) -> dict[str, Any]:
    return {
        "tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file), "client_ca_file": str(pki.ca_file)},
        "health_listen": "127.0.0.1:0",
        "auth": {
            "required": True,
            "callers": [
                {"name": "risk-engine", "cert_identities": ["risk.callers.internal"]},
                {
                    "name": "auditor",
                    "cert_identities": ["audit.callers.internal"],
                    "tools": ["echo", "sleep"],
                    "max_concurrent_runs": 1,
                    "runs_per_minute": 3,
                },
            ],
        },
    }


async def events_of(call: Any) -> list[pb.AgentEvent]:
    return [e async for e in call]


async def code_of(awaitable: Any) -> tuple[grpc.StatusCode, str]:
    try:
        await awaitable
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


async def test_mtls_identifies_the_caller_and_refuses_strangers(start_service: Any, pki: Pki) -> None:
    svc = await start_service(**mtls_config(pki))
    async with pki.channel(svc.port, identity="risk.callers.internal") as channel:
        events = await events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi", metadata={"caller": "x"})))
        assert events[-1].HasField("final_response")
        run = svc.registry.get(events[0].run_id)
        assert run.caller == "risk-engine" and run.spec.metadata["caller"] == "risk-engine"  # not the spoofed "x"
        audit = svc.executor.audit
        await audit.flush()
        rows = sqlite3.connect(audit.path).execute("SELECT run_id, metadata FROM audit").fetchall()
        assert [json.loads(meta)["caller"] for run_id, meta in rows if run_id == run.id] == ["risk-engine"]
    for channel in (pki.channel(svc.port), pki.channel(svc.port, identity="risk.callers.internal", rogue=True)):
        async with channel:  # no certificate, and one from another CA: the TLS handshake fails
            code, _ = await code_of(events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi"), timeout=5)))
            assert code == grpc.StatusCode.UNAVAILABLE
    async with pki.channel(svc.port, identity="stranger.callers.internal") as channel:  # right CA, unknown caller
        code, details = await code_of(events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi"))))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert "belongs to no configured caller" in details


async def test_a_token_sent_beside_a_certificate_is_checked_not_ignored(start_service: Any, pki: Pki) -> None:
    """An outside finding: with mTLS, a bad `authorization` header (or another caller's token) passed unseen."""
    config = mtls_config(pki)
    config["auth"]["callers"][0]["token_sha256"] = [token_hash("risk-token")]
    config["auth"]["callers"][1]["token_sha256"] = [token_hash("audit-token")]
    svc = await start_service(**config)
    async with pki.channel(svc.port, identity="risk.callers.internal") as channel:
        tools = stub(channel).ListTools
        assert (await code_of(tools(pb.ListToolsRequest(), metadata=[("authorization", "Bearer risk-token")])))[0] == (
            grpc.StatusCode.OK
        )
        for header, why in (
            ("Bearer bogus", "the bearer token is not valid"),
            ("Basic Zm9v", "the authorization header must be `Bearer <token>`"),
            ("Bearer audit-token", "the bearer token names another caller than the client certificate"),
        ):
            code, details = await code_of(tools(pb.ListToolsRequest(), metadata=[("authorization", header)]))
            assert code == grpc.StatusCode.UNAUTHENTICATED and details.startswith(why), (header, details)


async def test_health_is_reachable_without_credentials(start_service: Any, pki: Pki) -> None:
    svc = await start_service(**mtls_config(pki))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{svc.health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        code, _ = await code_of(stub(channel).ListTools(pb.ListToolsRequest()))
        assert code == grpc.StatusCode.UNIMPLEMENTED  # the probe port serves health only


async def test_a_caller_sees_and_uses_only_its_tools(start_service: Any, pki: Pki) -> None:
    svc = await start_service(**mtls_config(pki))
    async with pki.channel(svc.port, identity="audit.callers.internal") as channel:
        listed = await stub(channel).ListTools(pb.ListToolsRequest())
        assert sorted(t.name for t in listed.tools) == ["echo", "sleep"]
        events = await events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi")))
        assert sorted(events[0].run_started.tools) == ["echo", "sleep"]  # tools outside its rights are not offered
        code, details = await code_of(
            events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi", tools=["count"])))
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert details == "caller auditor may not use tool(s): count"


async def test_per_caller_concurrency_and_rate_limits(start_service: Any, pki: Pki) -> None:
    svc = await start_service(SLOW, **mtls_config(pki))
    async with pki.channel(svc.port, identity="audit.callers.internal") as channel:
        first = stub(channel).RunAgent(pb.RunAgentRequest(message="1"))
        async for event in first:
            if event.HasField("tool_call_ready"):
                break
        code, details = await code_of(events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="2"))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details == "caller auditor has 1 runs in progress, its limit; wait for one to end"
        first.cancel()
        for _ in range(200):
            if all(r.finished for r in svc.registry.runs.values()) and not svc.servicer.caller_limits.active.get(
                "auditor"
            ):
                break
            await asyncio.sleep(0.01)
        # another caller is not affected by the auditor's limits
        async with pki.channel(svc.port, identity="risk.callers.internal") as other:
            submitted = await stub(other).SubmitRun(pb.RunAgentRequest(message="other"))
            # ...nor can the auditor see the other caller's run
            code, _ = await code_of(stub(channel).GetRun(pb.GetRunRequest(run_id=submitted.run_id)))
            assert code == grpc.StatusCode.NOT_FOUND
            await stub(other).CancelRun(pb.CancelRunRequest(run_id=submitted.run_id))
        for message in ("3", "4"):  # the second and third runs of this minute, one after the other
            await events_of(stub(channel).RunAgent(pb.RunAgentRequest(message=message, tools=["echo"])))
        code, details = await code_of(events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="5"))))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith("caller auditor started 3 runs in the last minute, its limit; retry in")


def test_only_started_runs_count_against_runs_per_minute() -> None:
    now = [1000.0]
    limits = CallerLimits(clock=lambda: now[0])
    caller = Caller("batch", CallerConfig(name="batch", runs_per_minute=2), "token")
    for _ in range(5):  # admitted, then refused further on (queue full, ...): nothing counted
        assert limits.admit(caller) is None
    for _ in range(2):
        assert limits.admit(caller) is None
        limits.started(caller)
        now[0] += 10
    refused = limits.admit(caller)
    assert refused == "caller batch started 2 runs in the last minute, its limit; retry in 40 s"
    now[0] += 40  # the first start leaves the window
    assert limits.admit(caller) is None


async def test_runs_refused_for_a_full_queue_use_up_no_runs_per_minute(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(
        SLOW,
        runs={"background_max_concurrent": 1, "background_max_queued": 0},
        auth={"anonymous": {"name": "anon", "runs_per_minute": 3}},
    )
    api = stub(channel_to(svc))
    await api.SubmitRun(pb.RunAgentRequest(message="a"))  # runs, and fills the background queue
    for _ in range(3):  # the third would be the caller's fourth start of the minute, had refused runs counted
        code, details = await code_of(api.SubmitRun(pb.RunAgentRequest(message="b")))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details.startswith("the background queue is full"), details


def token_config(pki: Pki) -> dict[str, Any]:
    return {
        "tls": {"cert_file": str(pki.cert_file), "key_file": str(pki.key_file)},
        "auth": {"required": True, "callers": [{"name": "batch", "token_sha256": [token_hash("s3cret-token")]}]},
    }


async def test_bearer_tokens(start_service: Any, pki: Pki) -> None:
    svc = await start_service(**token_config(pki))
    async with pki.channel(svc.port) as channel:
        good = [("authorization", "Bearer s3cret-token")]
        events = await events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi"), metadata=good))
        assert svc.registry.get(events[0].run_id).caller == "batch"
        bad = [("authorization", "Bearer guessed")]
        code, details = await code_of(events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi"), metadata=bad)))
        assert (code, details) == (grpc.StatusCode.UNAUTHENTICATED, "the bearer token is not valid")
        code, details = await code_of(stub(channel).ListTools(pb.ListToolsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED and "credentials required" in details
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING  # health needs no token


def test_config_holds_token_hashes_not_tokens() -> None:
    from pydantic import ValidationError

    from service.config import AuthConfig

    with pytest.raises(ValidationError, match="64 hex characters"):
        AuthConfig.model_validate({"callers": [{"name": "x", "token_sha256": ["s3cret-token"]}]})


async def test_the_caller_is_in_the_run_span_and_the_log_lines(
    start_service: Any, pki: Pki, caplog: pytest.LogCaptureFixture, spans: Any
) -> None:
    svc = await start_service(**token_config(pki))
    async with pki.channel(svc.port) as channel:
        good = [("authorization", "Bearer s3cret-token")]
        with caplog.at_level("INFO", logger="service.driver"):
            await events_of(stub(channel).RunAgent(pb.RunAgentRequest(message="hi"), metadata=good))
    run_span = next(s for s in spans.get_finished_spans() if s.name == "run")
    assert run_span.attributes is not None and run_span.attributes["run.caller"] == "batch"
    started = next(r for r in caplog.records if r.getMessage() == "run started")
    assert started.metadata["caller"] == "batch"  # type: ignore[attr-defined]


def two_token_callers(**extra: Any) -> dict[str, Any]:
    """Plaintext is enough for tokens: two callers, `a` and `b`, whose tokens are their names."""
    callers = [{"name": name, "token_sha256": [token_hash(f"token-{name}")], **extra} for name in ("a", "b")]
    return {"auth": {"required": True, "callers": callers}}


def as_caller(name: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer token-{name}")]


async def test_another_callers_run_is_not_found_exactly_as_an_unknown_one(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(SLOW, **two_token_callers())
    api = stub(channel_to(svc))
    theirs = (await api.SubmitRun(pb.RunAgentRequest(message="a's"), metadata=as_caller("a"))).run_id
    unknown = "run_" + "0" * 24
    calls = {
        "GetRun": lambda run_id: api.GetRun(pb.GetRunRequest(run_id=run_id), metadata=as_caller("b")),
        "WatchRun": lambda run_id: events_of(api.WatchRun(pb.WatchRunRequest(run_id=run_id), metadata=as_caller("b"))),
        "CancelRun": lambda run_id: api.CancelRun(pb.CancelRunRequest(run_id=run_id), metadata=as_caller("b")),
    }
    for name, call in calls.items():
        code, details = await code_of(call(theirs))
        unknown_code, unknown_details = await code_of(call(unknown))
        # nothing tells b that the id names a run: not the code, not the message
        assert code == unknown_code == grpc.StatusCode.NOT_FOUND, name
        assert details.replace(theirs, "ID") == unknown_details.replace(unknown, "ID"), name
    assert not svc.registry.get(theirs).finished  # b's CancelRun did not reach it
    await api.CancelRun(pb.CancelRunRequest(run_id=theirs), metadata=as_caller("a"))


async def test_an_unknown_tool_is_answered_with_the_callers_tools_only(start_service: Any, channel_to: Any) -> None:
    svc = await start_service(**two_token_callers(tools=["echo", "sleep"]))
    request = pb.RunAgentRequest(message="hi", tools=["echo", "nope"])
    code, details = await code_of(events_of(stub(channel_to(svc)).RunAgent(request, metadata=as_caller("a"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert details == "unknown tool(s): nope; available: echo, sleep (see ListTools)"  # not count, fail, buggy…
    empty = pb.RunAgentRequest(message="hi", tools=["echo", ""])
    code, details = await code_of(events_of(stub(channel_to(svc)).RunAgent(empty, metadata=as_caller("a"))))
    assert (code, details) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "tools[1] is an empty name: list tools by name (see ListTools)",
    )
    long = pb.RunAgentRequest(message="hi", tools=["x" * 150])
    code, details = await code_of(events_of(stub(channel_to(svc)).RunAgent(long, metadata=as_caller("a"))))
    assert details.startswith(f"unknown tool(s): {'x' * 99}…;")  # cut, and said to be


async def test_a_certificate_with_sans_is_identified_by_them_never_by_its_cn(start_service: Any, pki: Pki) -> None:
    svc = await start_service(**mtls_config(pki))
    # the CN names a caller, the SAN names none: the SAN is the identity (RFC 6125: a CN is not looked at then)
    async with pki.channel(svc.port, identity="risk.callers.internal", sans=("build-bot.internal",)) as channel:
        code, details = await code_of(stub(channel).ListTools(pb.ListToolsRequest()))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert details == "the client certificate (build-bot.internal) belongs to no configured caller"
    async with pki.channel(svc.port, identity="unused", sans=("x.internal", "audit.callers.internal")) as channel:
        listed = await stub(channel).ListTools(pb.ListToolsRequest())  # any SAN of the certificate may name it
        assert sorted(t.name for t in listed.tools) == ["echo", "sleep"]
    async with pki.channel(svc.port, identity="audit.callers.internal", sans=()) as channel:
        listed = await stub(channel).ListTools(pb.ListToolsRequest())  # no SAN at all: the CN names the caller
        assert sorted(t.name for t in listed.tools) == ["echo", "sleep"]


@pytest.mark.parametrize(
    ("metadata", "outcome"),
    [
        ([("authorization", "bearer token-a")], "a"),  # the scheme is case-insensitive (RFC 9110)
        ([("authorization", "Bearer   token-a  ")], "a"),
        ([("authorization", "Bearer token-a"), ("authorization", "Bearer token-b")], "more than one"),
        ([("authorization", "Bearer token-a"), ("authorization", "Basic YTpi")], "more than one"),
        ([("authorization", "Basic YTpi")], "must be `Bearer <token>`"),
        ([("authorization", "Bearer")], "must be `Bearer <token>`"),
        ([("authorization", "Bearer  ")], "must be `Bearer <token>`"),
        ([("authorization", "token-a")], "must be `Bearer <token>`"),
    ],
)
async def test_the_authorization_header(
    start_service: Any, channel_to: Any, metadata: list[tuple[str, str]], outcome: str
) -> None:
    svc = await start_service(**two_token_callers())
    api = stub(channel_to(svc))
    code, details = await code_of(api.SubmitRun(pb.RunAgentRequest(message="hi"), metadata=metadata))
    if outcome == "a":
        assert code == grpc.StatusCode.OK
        assert [run.caller for run in svc.registry.runs.values()] == ["a"]
    else:  # never one of the headers picked: which one a proxy in between added is anyone's guess
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert outcome in details and "token-a" not in details
        assert not svc.registry.runs


@pytest.mark.parametrize(
    ("auth", "error"),
    [
        # unauthenticated calls would run as that caller: its runs, idempotency keys and limits
        ({"callers": [{"name": "anonymous", "token_sha256": [token_hash("t")]}]}, "anonymous callers' name"),
        ({"anonymous": {"name": "ops"}, "callers": [{"name": "ops"}]}, "anonymous callers' name"),
        # one of the two would silently be the other
        (
            {
                "callers": [
                    {"name": "a", "token_sha256": [token_hash("t")]},
                    {"name": "b", "token_sha256": [token_hash("t").upper()]},
                ]
            },
            "both a and b",
        ),
        (
            {
                "callers": [
                    {"name": "a", "cert_identities": ["x.internal"]},
                    {"name": "b", "cert_identities": ["x.internal"]},
                ]
            },
            "both a and b",
        ),
        ({"anonymous": {"name": "anon", "token_sha256": [token_hash("t")]}}, "anonymous callers present no"),
    ],
)
def test_config_refuses_callers_that_could_be_taken_for_one_another(auth: dict[str, Any], error: str) -> None:
    from pydantic import ValidationError

    from service.config import AuthConfig

    with pytest.raises(ValidationError, match=error):
        AuthConfig.model_validate(auth)


def test_token_hashes_are_made_from_stdin_never_from_arguments() -> None:
    import io

    from service import callers

    out, err = io.StringIO(), io.StringIO()
    assert callers.main([], io.StringIO("s3cret-token\n  other \n\n"), out, err) == 0
    assert out.getvalue().split() == [token_hash("s3cret-token"), token_hash("other")]  # as the server strips it
    out, err = io.StringIO(), io.StringIO()
    # an argument is in every user's `ps` and in the shell's history: refused, and not echoed
    assert callers.main(["s3cret-token"], io.StringIO(""), out, err) == 2
    assert out.getvalue() == "" and "stdin" in err.getvalue() and "s3cret-token" not in err.getvalue()


def test_token_hashes_come_from_the_command_the_readme_names() -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "service.auth"], input="s3cret-token\n", capture_output=True, text=True, timeout=60
    )
    assert (done.returncode, done.stdout.split()) == (0, [token_hash("s3cret-token")]), done.stderr


def test_the_wait_a_caller_is_told_is_never_short() -> None:
    now = [1000.0]
    limits = CallerLimits(clock=lambda: now[0])
    caller = Caller("batch", CallerConfig(name="batch", runs_per_minute=1), "token")
    limits.started(caller)
    now[0] += 59.6  # 0.4 s left: "retry in 0 s" sent callers straight back into the limit
    assert limits.admit(caller) == "caller batch started 1 runs in the last minute, its limit; retry in 1 s"
    now[0] += 0.4
    assert limits.admit(caller) is None


def test_config_refuses_certificate_identities_without_mutual_tls(tmp_path: Path) -> None:
    from pydantic import ValidationError

    callers = [{"name": "risk-engine", "cert_identities": ["risk.callers.internal"]}]
    tls = {"cert_file": str(tmp_path / "c.pem"), "key_file": str(tmp_path / "k.pem")}
    for without_client_ca in ({}, {"tls": tls}):  # no call can carry a client certificate: the caller never matches
        with pytest.raises(ValidationError, match="risk-engine: cert_identities need tls.client_ca_file"):
            make_config(tmp_path, auth={"callers": callers}, **without_client_ca)
    make_config(tmp_path, auth={"callers": callers}, tls={**tls, "client_ca_file": str(tmp_path / "ca.pem")})


async def test_tokens_without_tls_are_warned_about(start_service: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="service.rpc.server"):
        await start_service(**two_token_callers())
    warning = next(r for r in caplog.records if r.levelname == "WARNING")
    assert warning.getMessage().startswith("bearer tokens are configured but listen has no TLS")


async def test_the_cli_client_sends_a_token_from_the_environment_or_a_file(start_service: Any, tmp_path: Path) -> None:
    auth = {"required": True, "callers": [{"name": "batch", "token_sha256": [token_hash("s3cret-token")]}]}
    svc = await start_service(auth=auth)
    code, _, err = await cli(svc.port, "hi", env={"AGENT_TOKEN": ""})
    assert code == 1 and err.startswith("UNAUTHENTICATED: credentials required")
    code, out, err = await cli(svc.port, "--json", "hi", env={"AGENT_TOKEN": "s3cret-token"})
    assert code == 0, err
    assert svc.registry.get(json.loads(out.splitlines()[0])["runId"]).caller == "batch"
    (tmp_path / "token").write_text("s3cret-token\n")
    code, _, err = await cli(svc.port, "--token-file", str(tmp_path / "token"), "hi", env={"AGENT_TOKEN": ""})
    assert code == 0, err


async def test_the_cli_client_speaks_mutual_tls(start_service: Any, pki: Pki, tmp_path: Path) -> None:
    svc = await start_service(**mtls_config(pki))
    cert = pki.ca.issue_cert("risk.callers.internal")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    tls = ("--ca-file", str(pki.ca_file), "--cert-file", str(tmp_path / "client.pem"))
    code, out, err = await cli(
        svc.port, *tls, "--key-file", str(tmp_path / "client.key"), "--json", "hi", host="localhost"
    )
    assert code == 0, err
    assert svc.registry.get(json.loads(out.splitlines()[0])["runId"]).caller == "risk-engine"
    code, _, err = await cli(svc.port, *tls, "hi", host="localhost")
    assert code == 1 and "--cert-file and --key-file go together" in err


class _Context:
    """What `Authenticator.identify` reads of a grpc context, counting reads of the certificate's names."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.metadata = metadata
        self.auth_reads = 0

    def auth_context(self) -> dict[str, list[bytes]]:
        self.auth_reads += 1
        return {"x509_common_name": [b"risk.callers.internal"]}

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self.metadata


def test_the_certificate_is_read_only_when_it_can_matter() -> None:
    from service.config.callers import AuthConfig

    open_server, context = Authenticator(AuthConfig()), _Context()
    assert open_server.identify(context).name == "anonymous"
    assert context.auth_reads == 0  # no caller known by a certificate, none required: its names change nothing
    with pytest.raises(Unauthenticated, match="the bearer token is not valid"):
        open_server.identify(_Context((("authorization", "Bearer nope"),)))
    by_cert = Authenticator(AuthConfig(callers=[CallerConfig(name="risk", cert_identities=["risk.callers.internal"])]))
    assert by_cert.identify(context).name == "risk"
    required = Authenticator(AuthConfig(required=True))
    with pytest.raises(Unauthenticated, match=r"certificate \(risk.callers.internal\) belongs to no configured"):
        required.identify(context)
    assert context.auth_reads == 2


async def test_the_checks_are_set_at_registration_not_run_by_grpc_per_call(
    start_service: Any, channel_to: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    from service.rpc.interceptors import RejectUndecodable

    async def per_call(*args: Any) -> None:
        raise AssertionError("grpc ran an interceptor on a call")

    monkeypatch.setattr(AuthInterceptor, "intercept_service", per_call)
    monkeypatch.setattr(RejectUndecodable, "intercept_service", per_call)
    svc = await start_service(**two_token_callers())
    channel = channel_to(svc)
    api = stub(channel)
    assert (await code_of(api.ListTools(pb.ListToolsRequest())))[0] == grpc.StatusCode.UNAUTHENTICATED
    assert [
        e.WhichOneof("event") async for e in api.RunAgent(pb.RunAgentRequest(message="hi"), metadata=as_caller("a"))
    ]
    undecodable = channel.unary_unary("/agent.v1.AgentService/ListTools")(b"\xff", metadata=as_caller("a"))
    assert (await code_of(undecodable))[0] == grpc.StatusCode.INVALID_ARGUMENT
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    listing = reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert (await code_of(events_of(listing)))[0] == grpc.StatusCode.UNAUTHENTICATED  # reflection is guarded too
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())  # and health is not
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_anonymous_rights_given_without_a_name_keep_the_default_name() -> None:
    """An outside finding: `auth.anonymous: {max_concurrent_runs: 2}` failed with "auth.anonymous.name: Field
    required", though the docs give the name a default."""
    auth = AuthConfig.model_validate({"anonymous": {"max_concurrent_runs": 2}})
    assert (auth.anonymous.name, auth.anonymous.max_concurrent_runs) == ("anonymous", 2)
    assert AuthConfig.model_validate({"anonymous": {"name": "anon"}}).anonymous.name == "anon"
