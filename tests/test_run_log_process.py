"""The embedded default across `kill -9`: a real `python -m service` on a data_dir, no Redis or PostgreSQL. Its durable
runs (CONTINUE, SubmitRun) answer GetRun and WatchRun after a restart on the same data_dir, with the very events and
seqs 1..k the first process logged, and go on from their last checkpoint to their end; a plain run is not kept."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import sys
from pathlib import Path

import grpc

from agent.v1 import agent_pb2 as pb
from conftest import stub

# slow enough that a run is still going when the process is killed, fast enough for a short test
CONFIG = "model:\n  pacing: {first_token_ms: 20, token_interval_ms: 30}\nshutdown_grace_s: 1\n"


async def serve(tmp_path: Path) -> tuple[asyncio.subprocess.Process, int]:
    config = tmp_path / "config.yaml"
    config.write_text(CONFIG)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "service", "--config", str(config), "--listen", "127.0.0.1:0"),
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "AGENT_DATA_DIR": str(tmp_path / "var"), "ANTHROPIC_API_KEY": ""},
    )
    assert proc.stderr is not None
    while True:
        line = await asyncio.wait_for(proc.stderr.readline(), 30)
        assert line, "the service exited before serving"
        record = json.loads(line)
        if record["msg"] == "serving":
            return proc, int(record["port"])


def files_after_the_kill(data_dir: Path, run_id: str) -> tuple[int, list[int]]:
    """What the killed process left on disk of a run: the last seq of its gapless log, and the seqs its checkpoints
    were taken at (both in durable.db: one transaction for a checkpoint and the events before it)."""
    with sqlite3.connect(data_dir / "durable.db") as db:
        rows = db.execute("SELECT first_seq, last_seq FROM events WHERE run_id = ? ORDER BY last_seq", (run_id,))
        logged = [seq for first, last in rows for seq in range(first, last + 1)]
    assert logged == list(range(1, len(logged) + 1))
    with sqlite3.connect(data_dir / "durable.db") as db:
        steps = [seq for (seq,) in db.execute("SELECT seq FROM run_steps WHERE run_id = ?", (run_id,))]
    return len(logged), steps


async def written(path: Path, run_id: str, seq: int) -> None:
    def reached() -> bool:
        with sqlite3.connect(path) as db:
            row = db.execute("SELECT last_seq FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        return row is not None and row[0] >= seq

    async with asyncio.timeout(10):
        while not await asyncio.to_thread(reached):  # noqa: ASYNC110 (written by another process)
            await asyncio.sleep(0.01)


async def kill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
        await proc.wait()


def seqs(events: list[pb.AgentEvent]) -> list[int]:
    """The seqs a stream covered: a replay merges consecutive deltas into one delivery (first_seq..seq)."""
    return [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)]


def text(events: list[pb.AgentEvent]) -> str:
    return "".join(e.text_delta.text for e in events if e.WhichOneof("event") == "text_delta")


def whole(events: list[pb.AgentEvent]) -> list[pb.AgentEvent]:
    """The events that are never merged (compared as messages: a Struct's bytes depend on its map's order)."""
    return [e for e in events if e.WhichOneof("event") not in ("text_delta", "thinking")]


async def test_kill_9_and_restart_keeps_durable_runs_answerable(tmp_path: Path) -> None:
    proc, port = await serve(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            agent = stub(channel)
            done = [
                e
                async for e in agent.RunAgent(
                    pb.RunAgentRequest(message="first", on_disconnect=pb.RunAgentRequest.CONTINUE)
                )
            ]
            assert done[-1].WhichOneof("event") == "final_response"
            plain = [e async for e in agent.RunAgent(pb.RunAgentRequest(message="plain"))]
            submitted = await agent.SubmitRun(pb.RunAgentRequest(message="background"))
            call = agent.RunAgent(pb.RunAgentRequest(message="cut", on_disconnect=pb.RunAgentRequest.CONTINUE))
            seen: list[pb.AgentEvent] = []
            async for event in call:
                seen.append(event)
                if event.WhichOneof("event") == "tool_result":  # past two checkpoints: turn 1 and this result
                    break
            call.cancel()
            # the writer lingers 5 ms; on a loaded machine its round may take longer: kill once it is out
            await written(tmp_path / "var" / "durable.db", seen[-1].run_id, seen[-1].seq)
            await kill(proc)
        cut_id = seen[0].run_id
        kept, steps = files_after_the_kill(tmp_path / "var", cut_id)
        assert steps and kept >= max(steps), "the log reaches every checkpoint's seq (flushed before each)"

        proc, port = await serve(tmp_path)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            agent = stub(channel)
            record = await agent.GetRun(pb.GetRunRequest(run_id=done[0].run_id))
            assert record.state == pb.Run.SUCCEEDED and record.last_seq == len(done)
            replay = [e async for e in agent.WatchRun(pb.WatchRunRequest(run_id=done[0].run_id))]
            assert seqs(replay) == list(range(1, len(done) + 1))
            assert (text(replay), whole(replay)) == (text(done), whole(done))

            cut = await agent.GetRun(pb.GetRunRequest(run_id=cut_id))
            assert cut.last_seq >= len(seen), "every event written before the kill is kept"
            # resumed at start from its last checkpoint: replayed from 1, then live to its end, with no gap
            replayed = [e async for e in agent.WatchRun(pb.WatchRunRequest(run_id=cut_id, after_seq=0))]
            assert seqs(replayed) == list(range(1, replayed[-1].seq + 1)), "1..n, no gap"
            assert text(replayed).startswith(text(seen)) and whole(replayed)[: len(whole(seen))] == whole(seen)
            kinds = [e.WhichOneof("event") for e in replayed]
            assert kinds.count("run_recovered") == 1 and kinds.count("run_started") == 1
            assert kinds[-1] == "final_response"
            assert (await agent.GetRun(pb.GetRunRequest(run_id=cut_id))).state == pb.Run.SUCCEEDED

            background = [e async for e in agent.WatchRun(pb.WatchRunRequest(run_id=submitted.run_id))]
            assert seqs(background) == list(range(1, background[-1].seq + 1))
            assert background[-1].WhichOneof("event") == "final_response"
            try:
                await agent.GetRun(pb.GetRunRequest(run_id=plain[0].run_id))
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.NOT_FOUND
            else:
                raise AssertionError("a plain (CANCEL) run is not kept across a restart")
        print(
            f"\nkill -9: {cut.last_seq} events kept of the cut run ({len(seen)} seen), {len(replayed)} after resuming"
        )
    finally:
        await kill(proc)


async def test_a_caller_sent_events_the_kill_lost_is_told_and_sent_the_run_again(tmp_path: Path) -> None:
    """A durable stream is sent events before the file holds them: killed just after one, the restarted process may
    have given those seqs to other events. The caller's WatchRun from its last seq then starts at `run_recovered`
    (at or before that seq), and what it holds before it plus what it is sent is exactly the run's log."""
    proc, port = await serve(tmp_path)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = stub(channel).RunAgent(pb.RunAgentRequest(message="cut", on_disconnect=pb.RunAgentRequest.CONTINUE))
            seen: list[pb.AgentEvent] = []
            async for event in call:
                seen.append(event)
                if event.WhichOneof("event") == "text_delta" and len(seen) > 3:
                    await kill(proc)  # at once: the writer lingers 5 ms, so this delta is most likely not kept
                    break
            call.cancel()
        run_id, last = seen[0].run_id, seen[-1].seq
        kept, _ = files_after_the_kill(tmp_path / "var", run_id)
        proc, port = await serve(tmp_path)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            agent = stub(channel)
            rest = [e async for e in agent.WatchRun(pb.WatchRunRequest(run_id=run_id, after_seq=last), timeout=30)]
            whole_log = [e async for e in agent.WatchRun(pb.WatchRunRequest(run_id=run_id), timeout=30)]
        first = rest[0].first_seq or rest[0].seq
        if kept < last:  # the kill lost what the caller was sent last: it is told, from the recovery on
            assert rest[0].HasField("run_recovered") and first == kept + 1 <= last
        else:
            assert first == last + 1
        merged = [e for e in seen if e.seq < first] + rest
        assert seqs(merged) == seqs(whole_log) == list(range(1, whole_log[-1].seq + 1))
        assert (text(merged), whole(merged)) == (text(whole_log), whole(whole_log))
        assert whole_log[-1].WhichOneof("event") == "final_response"
        print(f"\nkill -9 after seq {last} was sent: {kept} kept, WatchRun(after_seq={last}) went on from {first}")
    finally:
        await kill(proc)
