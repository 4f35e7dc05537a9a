"""Durable runs across `kill -9`, with real server processes (`python -m service`): a fake Anthropic API on loopback
counts the model requests, the `effect` tools count their executions in files. One node restarted on its data_dir
continues its run; in a fleet (Redis + PostgreSQL) the surviving process takes the dead one's run over.

In both: no model turn is requested twice, the unsafe call the kill cut off is not run again but reported
OUTCOME_UNKNOWN, the safe one runs again (with the same idempotency key), and the run finishes with gapless seqs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from backends import PostgresSchema, RedisNamespace, audit_key_file

from agent.v1 import agent_pb2 as pb
from conftest import stub
from fake_anthropic import FakeAnthropic

TESTS = Path(__file__).parent


class Fleet:
    """Server processes of one test, all on one config but each with a data_dir of its own (by name)."""

    def __init__(self, tmp_path: Path, fake: FakeAnthropic, **sections: Any) -> None:
        self.tmp_path = tmp_path
        self.fake = fake
        self.effects = {name: tmp_path / f"{name}.log" for name in ("effect", "effect_safe")}
        self.config = tmp_path / "config.yaml"
        self.config.write_text(
            yaml.safe_dump(
                {
                    "listen": "127.0.0.1:0",
                    "metrics_listen": "127.0.0.1:0",
                    "shutdown_grace_s": 1,
                    "model": {"provider": "anthropic", "retry": {"attempts": 1}},
                    "tool_modules": ["effect_tool", "effect_safe_tool"],
                    "tools": {name: {"log": str(path)} for name, path in self.effects.items()},
                    "durable": {"recover_interval_s": 0.5},
                    **sections,
                }
            )
        )
        self.procs: list[Any] = []
        self.readers: list[asyncio.Task[bytes]] = []

    async def start(self, name: str) -> tuple[Any, int]:
        env = {
            **os.environ,
            "AGENT_DATA_DIR": str(self.tmp_path / name),
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": self.fake.base_url,
            "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "service", "--config", str(self.config), stderr=asyncio.subprocess.PIPE, env=env
        )
        self.procs.append(proc)
        assert proc.stderr is not None
        async with asyncio.timeout(30):
            port = None
            async for line in proc.stderr:
                if (record := json.loads(line))["msg"] == "serving":
                    port = int(record["port"])
                    break
        assert port is not None, "the service exited before serving"
        self.readers.append(asyncio.create_task(proc.stderr.read()))  # keeps its pipe drained
        return proc, port

    def hold(self) -> None:
        for path in self.effects.values():
            path.with_name(path.name + ".hold").touch()

    def release(self) -> None:
        for path in self.effects.values():
            path.with_name(path.name + ".hold").unlink()

    def executions(self, tool: str) -> list[str]:
        path = self.effects[tool]
        return path.read_text().split() if path.exists() else []

    async def both_started(self) -> None:
        while not (self.executions("effect") and self.executions("effect_safe")):  # noqa: ASYNC110 (another process)
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        for proc in self.procs:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            await asyncio.wait_for(proc.wait(), 30)


@pytest.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic() as server:
        server.script_turn("Working.", tool_uses=[("effect", {"text": "a"}), ("effect_safe", {"text": "b"})])
        server.script_turn("done")
        yield server


async def start_run(port: int) -> tuple[str, asyncio.Task[grpc.aio.AioRpcError | None]]:
    """A run that outlives its call (CONTINUE: durable by default), its stream read in the background to its end
    (the task's result: the status it ended with, None for OK)."""
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    call = stub(channel).RunAgent(pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE))
    first = await call.read()
    assert first.HasField("run_started")

    async def drain() -> grpc.aio.AioRpcError | None:
        try:
            while await call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            await channel.close()
        return None

    return first.run_id, asyncio.create_task(drain())


async def watch(port: int, run_id: str) -> list[pb.AgentEvent]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        return [e async for e in stub(channel).WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30)]


def check_continued(fleet: Fleet, events: list[pb.AgentEvent]) -> None:
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds.count("run_recovered") == 1, kinds
    results = {e.tool_result.name: e.tool_result for e in events if e.HasField("tool_result")}
    assert results["effect"].status == pb.TOOL_STATUS_OUTCOME_UNKNOWN
    assert results["effect_safe"].status == pb.TOOL_STATUS_OK
    assert events[-1].final_response.text == "done"
    assert [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)] == list(range(1, events[-1].seq + 1))
    assert len(fleet.fake.requests) == 2  # turn 1 before the kill, turn 2 after: none requested twice
    assert len(fleet.executions("effect")) == 1  # the unsafe call: never sent again
    safe = fleet.executions("effect_safe")
    assert len(safe) == 2 and safe[0] == safe[1]  # at least once, with the same idempotency key (run id:call id)
    assert safe[0].startswith(events[0].run_id + ":")


async def test_kill_9_and_restart_on_the_same_data_dir_continues_the_run(tmp_path: Path, fake: FakeAnthropic) -> None:
    fleet = Fleet(tmp_path, fake)
    try:
        fleet.hold()
        proc, port = await fleet.start("node")
        run_id, stream = await start_run(port)
        await asyncio.wait_for(fleet.both_started(), 15)
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
        await stream
        fleet.release()
        _, port = await fleet.start("node")
        events = await watch(port, run_id)
        recovered = next(e for e in events if e.HasField("run_recovered"))
        # what was logged up to the last checkpoint before the kill is kept (durable.db), run_recovered after it
        assert events[0].HasField("run_started") and 0 < recovered.run_recovered.seq < recovered.seq
        check_continued(fleet, events)
        with sqlite3.connect(tmp_path / "node" / "deadletter.db") as db:  # for reconciliation
            letters = db.execute("SELECT run_id, tool, status, error_type FROM dead_letters").fetchall()
        assert letters == [(run_id, "effect", "outcome_unknown", "OutcomeUnknown")]
    finally:
        await fleet.stop()


@pytest.fixture
async def shared(
    tmp_path: Path, fake: FakeAnthropic, redis_ns: RedisNamespace, postgres_schema: PostgresSchema
) -> AsyncIterator[Fleet]:
    """Processes on one Redis prefix and one PostgreSQL schema."""
    fleet = Fleet(
        tmp_path,
        fake,
        state={"url": redis_ns.url, "prefix": redis_ns.prefix},
        records={"url": postgres_schema.url},
        audit={"key_file": str(audit_key_file(tmp_path))},
    )
    yield fleet
    await fleet.stop()


async def two_with_a_run_mid_call(fleet: Fleet) -> tuple[Any, int, str, asyncio.Task[grpc.aio.AioRpcError | None]]:
    """Processes a and b, a run on a with both its tool calls running (held): a, b's port, the run, its stream."""
    fleet.hold()
    proc_a, port_a = await fleet.start("a")
    _, port_b = await fleet.start("b")
    run_id, stream = await start_run(port_a)
    await asyncio.wait_for(fleet.both_started(), 15)
    return proc_a, port_b, run_id, stream


async def test_kill_9_in_a_fleet_the_survivor_takes_the_run_over(shared: Fleet) -> None:
    doomed, port_b, run_id, stream = await two_with_a_run_mid_call(shared)
    watcher = asyncio.create_task(watch(port_b, run_id))  # from the survivor, opened before the kill
    await asyncio.sleep(0.2)
    doomed.send_signal(signal.SIGKILL)
    killed = time.monotonic()
    await doomed.wait()
    await stream
    shared.release()
    live = await asyncio.wait_for(watcher, 30)
    took = time.monotonic() - killed
    assert took < 5, f"the run went on {took:.1f} s after the kill"
    check_continued(shared, live)
    after = await watch(port_b, run_id)  # the whole log, once more, from the store
    check_continued(shared, after)
    recovered = next(e for e in after if e.HasField("run_recovered"))
    assert recovered == next(e for e in live if e.HasField("run_recovered"))
    # after what Redis held of the dead process's log (at least its turn 1 and both tool calls)
    assert recovered.seq > recovered.run_recovered.seq > 0


async def test_a_drained_process_hands_its_run_to_the_peer(shared: Fleet) -> None:
    """SIGTERM with a run that cannot finish within the grace: the caller's stream ends UNAVAILABLE saying where to
    WatchRun from, the process exits cleanly, and the peer continues the run at once (released, not failed)."""
    draining, port_b, run_id, stream = await two_with_a_run_mid_call(shared)
    draining.send_signal(signal.SIGTERM)
    ended = await asyncio.wait_for(stream, 15)
    assert await asyncio.wait_for(draining.wait(), 15) == 0
    shared.release()
    assert ended is not None and ended.code() == grpc.StatusCode.UNAVAILABLE
    details = str(ended.details())
    assert "handed over" in details and "it goes on elsewhere" in details and "after_seq=" in details
    after_seq = int(details.rpartition("after_seq=")[2].rstrip(")"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port_b}") as channel:
        request = pb.WatchRunRequest(run_id=run_id, after_seq=after_seq)
        rest = [e async for e in stub(channel).WatchRun(request, timeout=30)]
    # from the first seq the stream was not sent (events stored as the drain flushed them, then run_recovered)
    assert rest[0].seq == after_seq + 1 and any(e.HasField("run_recovered") for e in rest)
    check_continued(shared, await watch(port_b, run_id))


async def test_after_kill_9_a_resumed_run_keeps_its_key_quota_and_deadline(tmp_path: Path, fake: FakeAnthropic) -> None:
    """One node, restarted on its data_dir with the run resumed (its safe call running again, held): the run's
    idempotency key attaches to it, it counts toward the caller's max_concurrent_runs, and it ends at runs.max_run_s
    from its first start, not from the restart."""
    max_run_s = 12.0  # long enough for a restart on a loaded machine within it
    fleet = Fleet(
        tmp_path,
        fake,
        auth={"anonymous": {"name": "anonymous", "max_concurrent_runs": 1}},
        runs={"max_run_s": max_run_s},
    )
    request = pb.RunAgentRequest(message="go", on_disconnect=pb.RunAgentRequest.CONTINUE, idempotency_key="k1")
    try:
        fleet.hold()
        proc, port = await fleet.start("node")
        started = time.time()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = stub(channel).RunAgent(request)
            run_id = (await call.read()).run_id
            await asyncio.wait_for(fleet.both_started(), 15)
            await asyncio.sleep(max(0.0, started + 3.0 - time.time()))  # a fresh deadline: 3 s later and more
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            call.cancel()
        _, port = await fleet.start("node")  # its effect_safe call runs again, and waits (held)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            agent = stub(channel)
            other = pb.RunAgentRequest(message="other", on_disconnect=pb.RunAgentRequest.CONTINUE, idempotency_key="k2")
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await agent.RunAgent(other).read()
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, "the resumed run counts"
            again = agent.RunAgent(request)
            assert (await again.read()).run_id == run_id, "the key attaches to the resumed run"
            again.cancel()
            with pytest.raises(grpc.aio.AioRpcError) as failed:  # the stream ends with the run's failure
                async for _ in agent.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30):
                    pass
            ended = time.time()
            record = await agent.GetRun(pb.GetRunRequest(run_id=run_id))
        assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and record.state == pb.Run.FAILED
        took = record.ended.ToDatetime().timestamp() - started
        assert took < max_run_s + 2, f"ended {took:.1f} s after its first start: its deadline was not kept"
        print(
            f"\nresumed run ended {took:.1f} s after its first start (max_run_s {max_run_s:g}), {ended - started:.1f}"
        )
    finally:
        fleet.release()
        await fleet.stop()
