"""One chaos round: a fleet of replicas on the real Redis and PostgreSQL, the fake model and the effect counter on
loopback, callers keeping runs in flight, and a SIGKILL of a random replica every few seconds (restarted a moment
later), then the checks of `checks.py` over what everyone saw."""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import grpc

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from bench.chaos.checks import Report, RunLog, check
from bench.chaos.clients import Callers
from bench.chaos.effects import Effects
from bench.chaos.fleet import Backends, Fleet, Replica, write_config
from bench.chaos.model import ChaosModel


@dataclass(frozen=True)
class Plan:
    replicas: int = 3
    in_flight: int = 12  # runs in flight at any time (half streamed with CONTINUE, half submitted)
    duration_s: float = 60.0  # how long replicas are killed
    kill_every_s: float = 5.0  # mean time between two kills (uniform within ±40 %)
    # every other kill, the first among them, waits (up to kill_every_s) for an unsafe call to reach the upstream and
    # kills its caller then, so that a round always covers a side effect cut off mid-flight; the others are random
    aim: bool = True
    restart_after_s: float = 1.0  # a killed replica starts again this long after its kill
    settle_s: float = 90.0  # after the chaos, how long the runs have to end
    turns: int = 3  # model turns per run (all but the last call two tools)
    delay_s: float = 0.02  # between two streamed model events
    hold_s: float = 0.3  # the upstream's time to answer a tool call
    seed: int = 0


async def run_chaos(workdir: Path, backends: Backends | None, plan: Plan, say: Callable[[str], None] = print) -> Report:
    """One round; with `backends` None, one embedded replica (SQLite, no Redis) killed and restarted."""
    if backends is None and plan.replicas != 1:
        raise ValueError("the embedded default is one node: replicas must be 1 without Redis and PostgreSQL")
    rng = random.Random(plan.seed)
    effects, model = Effects(plan.hold_s), None
    fleet: Fleet | None = None
    try:
        await effects.start()
        model = ChaosModel(effects.url, turns=plan.turns, delay=plan.delay_s)
        model_url = await model.start()
        config = write_config(workdir, backends, model_url, effects.url)
        fleet = Fleet(workdir, config, model_url, plan.replicas)
        await fleet.start()
        say(f"chaos: {plan.replicas} replicas serving ({', '.join(r.target for r in fleet.replicas)})")
        callers = Callers(fleet, plan.in_flight, seed=plan.seed)
        driving = asyncio.create_task(callers.run())
        kills = await _kill_loop(fleet, effects, plan, rng, say)
        callers.stop()
        await asyncio.wait({driving}, timeout=plan.settle_s)
        if not driving.done():
            say(f"chaos: runs still going {plan.settle_s:g} s after the chaos; abandoning them")
            driving.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await driving
        runs = await _collect(fleet, callers)
        await fleet.stop()  # SIGTERM: each replica drains and writes what its records spool still holds
        dead = await _dead_letters(backends.postgres_url) if backends is not None else None
        return check(runs, model, effects, kills, dead_letters=dead)
    finally:
        if fleet is not None:
            await fleet.stop()
        if model is not None:
            await model.stop()
        await effects.stop()


async def _kill_loop(
    fleet: Fleet, effects: Effects, plan: Plan, rng: random.Random, say: Callable[[str], None]
) -> list[float]:
    """SIGKILL a random live replica (never the last one, unless there is only one) every ~`kill_every_s` for
    `duration_s`; each is started again `restart_after_s` later. Returns the kill times, once every replica serves
    again."""
    kills: list[float] = []
    restarts: list[asyncio.Task[None]] = []
    end = time.monotonic() + plan.duration_s
    while (left := end - time.monotonic()) > 0:
        await asyncio.sleep(min(left, plan.kill_every_s * rng.uniform(0.6, 1.4)))
        live = fleet.live()
        if time.monotonic() >= end or len(live) < min(2, plan.replicas):
            continue
        aimed = plan.aim and len(kills) % 2 == 0
        found = await _caller_of_unsafe_call(fleet, effects, plan) if aimed else None
        victim = found or rng.choice(live)
        target = victim.target
        kills.append(fleet.kill(victim))
        how = "mid unsafe call" if found else "at random"
        say(f"chaos: t={plan.duration_s - (end - time.monotonic()):5.1f} s kill -9 {victim.name} ({target}) {how}")
        restarts.append(asyncio.create_task(_restart_later(fleet, victim, plan.restart_after_s)))
    await asyncio.gather(*restarts)
    return kills


async def _caller_of_unsafe_call(fleet: Fleet, effects: Effects, plan: Plan) -> Replica | None:
    """The live replica that has an unsafe call at the upstream right now, waiting up to `kill_every_s` for one."""
    deadline = time.monotonic() + plan.kill_every_s
    while time.monotonic() < deadline:
        for port in list(effects.unsafe_in_flight.values()):
            if (replica := fleet.holding(port)) is not None and len(fleet.live()) >= min(2, plan.replicas):
                return replica
        effects.unsafe_arrived.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(effects.unsafe_arrived.wait(), max(0.0, deadline - time.monotonic()))
    return None


async def _restart_later(fleet: Fleet, replica: Replica, after_s: float) -> None:
    await fleet.wait_dead(replica)
    await asyncio.sleep(after_s)
    await fleet.restart(replica)


async def _collect(fleet: Fleet, callers: Callers) -> list[RunLog]:
    """Each run's record (GetRun) and whole log (WatchRun after_seq=0) from every replica."""
    runs = [RunLog(seen) for seen in callers.seen]
    channels = {r.name: grpc.aio.insecure_channel(r.target) for r in fleet.live()}
    try:
        stubs = {name: agent_pb2_grpc.AgentServiceStub(c) for name, c in channels.items()}
        sem = asyncio.Semaphore(16)

        async def one(run: RunLog) -> None:
            if not run.seen.run_id:
                run.problem = f"never started ({run.seen.error or 'no run id'})"
                return
            async with sem:
                try:
                    for name, stub in stubs.items():
                        call = stub.WatchRun(pb.WatchRunRequest(run_id=run.seen.run_id, after_seq=0), timeout=10)
                        run.logs[name] = [e async for e in call]
                    run.state, run.last_seq = await _record(next(iter(stubs.values())), run)
                except grpc.aio.AioRpcError as err:
                    run.problem = f"the fleet cannot tell: {err.code().name}: {err.details()}"

        await asyncio.gather(*(one(run) for run in runs))
    finally:
        for channel in channels.values():
            await channel.close()
    return runs


async def _dead_letters(postgres_url: str) -> set[str]:
    """The `run_id:call_id` of every call dead-lettered as OutcomeUnknown in the fleet's records database."""
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_url, autocommit=True) as conn:
        cursor = await conn.execute("SELECT run_id, call_id FROM dead_letters WHERE error_type = 'OutcomeUnknown'")
        return {f"{run_id}:{call_id}" for run_id, call_id in await cursor.fetchall()}


async def _record(stub: agent_pb2_grpc.AgentServiceStub, run: RunLog) -> tuple[int, int]:
    """GetRun's state and last seq, once they agree with the log just read: a replica's record of a run another
    drove may trail its log by a moment (counted in `record_lag`, polled for up to 5 s)."""
    ended = bool(run.events) and run.events[-1].WhichOneof("event") in ("final_response", "error")
    for _ in range(50):
        record = await stub.GetRun(pb.GetRunRequest(run_id=run.seen.run_id), timeout=10)
        if not ended or record.state in TERMINAL:
            break
        run.record_lag += 1
        await asyncio.sleep(0.1)
    return record.state, record.last_seq


TERMINAL = (pb.Run.SUCCEEDED, pb.Run.FAILED, pb.Run.CANCELLED)


def render(report: Report, plan: Plan) -> str:
    f = report.figures()
    lines = [
        f"chaos: {plan.replicas} replicas, {plan.in_flight} runs in flight, {plan.duration_s:g} s of kill -9 every "
        f"~{plan.kill_every_s:g} s",
        f"  runs {f['runs']}: {f['states']}; kills {f['kills']}; caller stream breaks {f['caller_stream_breaks']}; "
        f"seqs re-sent after a restart {f['caller_seqs_resent']}",
        f"  model requests {f['model_requests']}; turns requested again after a crash "
        f"{f['turns_requested_again']}; after a recorded turn {f['model_requests_after_recorded_turn']} (must be 0)",
        f"  unsafe calls {f['unsafe_calls']}: max executions per call {f['unsafe_max_executions_per_call']} "
        f"(must be <= 1), cut off mid-flight {f['unsafe_interrupted']}; "
        f"OUTCOME_UNKNOWN reported {f['outcome_unknown']} ({f['outcome_unknown_never_reached_upstream']} of them "
        f"had not reached the upstream; dead-lettered {_n(f['outcome_unknown_dead_lettered'])})",
        f"  safe calls {f['safe_calls']}, run more than once {f['safe_calls_repeated']} (allowed)",
        f"  run_recovered {f['run_recovered_events']}; kill to resumption p50 {_s(f['kill_to_resume_p50_s'])}, "
        f"p99 {_s(f['kill_to_resume_p99_s'])}, max {_s(f['kill_to_resume_max_s'])}",
        f"  violations: {len(report.violations)} {f['violations_by_kind'] or ''}",
    ]
    lines += [f"    - {v}" for v in report.violations[:50]]
    if len(report.violations) > 50:
        lines.append(f"    … and {len(report.violations) - 50} more")
    return "\n".join(lines)


def _n(value: int | None) -> str:
    return "not read" if value is None else str(value)


def _s(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} s"


@contextlib.asynccontextmanager
async def own_backends(redis_url: str, postgres_url: str) -> AsyncIterator[Backends]:
    """A Redis key prefix and a PostgreSQL schema of the harness's own on the shared servers, removed after it (as
    the tests' fixtures do, `tests/backends.py`): nothing else on them is touched."""
    import psycopg
    import redis.asyncio as redis

    tag = secrets.token_hex(6)
    schema = f"chaos_{tag}"
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in postgres_url else "?"
    backends = Backends(redis_url, f"chaos:{tag}:", f"{postgres_url}{sep}options={quote(f'-csearch_path={schema}')}")
    try:
        yield backends
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")
        client = redis.Redis.from_url(redis_url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{backends.redis_prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()
