"""What callers who never read the code sent, found by calling a real server with grpcurl and curl, and what they
get now: a clear refusal with the right status, never UNKNOWN or INTERNAL for their mistake, nor a crash later."""

from __future__ import annotations

import logging
from typing import Any

import grpc
import pytest

from agent.v1 import agent_pb2 as pb
from conftest import stub


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
