"""The composition root: every part of the service is built here, from the config, and handed what it needs. No other
module builds its siblings; follow `start` to see the whole service.

    tools ─┐
    model ─┼─ executor (policies, audit, dead letters, redaction) ─ loop ─ registry ─┐
           │                                                                         ├─ api ─┬─ servicer ─ gRPC server
    config ┴─ authenticator, caller limits ──────────────────────────────────────────┘       └─ HTTP face (uvicorn)
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from service import redact, telemetry
from service.api import AgentApi
from service.approvals import Approvals
from service.callers import CallerLimits
from service.config import Config
from service.deliver import Deliveries
from service.durable.base import CheckpointStore
from service.durable.executor_id import executor_id
from service.durable.sqlite import DEFAULT_FILE as DURABLE_FILE
from service.durable.sqlite import SqliteCheckpointStore
from service.durable_runs import DurableRuns
from service.executor import Executor
from service.loop import AgentLoop
from service.models.base import Model
from service.models.scripted import Scenario, ScriptedModel
from service.policy.config import PolicyError, resolve
from service.policy.shared import Reachability, SharedPolicy
from service.push.guard import UrlGuard
from service.push.pusher import Pusher
from service.push.store import DEFAULT_FILE as PUSH_FILE
from service.push.store import DeliveryStore, SqliteDeliveryStore
from service.records.audit import DEFAULT_FILE as AUDIT_FILE
from service.records.audit import AuditLog
from service.records.audit_chain import load_keyring, require_given_key
from service.records.deadletter import DEFAULT_FILE as DEAD_LETTER_FILE
from service.records.deadletter import DeadLetterStore
from service.records.spool import DEFAULT_FILE as SPOOL_FILE
from service.records.sqlite import sqlite_path
from service.records.stores import Records
from service.records.summaries import DEFAULT_FILE as SUMMARIES_FILE
from service.records.summaries import SqliteRunSummaryStore
from service.redact import Redactor
from service.rpc.auth import Authenticator, AuthInterceptor
from service.rpc.interceptors import RejectUndecodable, tracing_interceptors
from service.rpc.server import Service, start_server
from service.rpc.servicer import AgentServicer
from service.rpc.store_health import RECORDS_HEALTH, RECORDS_QUARANTINE_HEALTH, STATE_HEALTH, HealthReport
from service.runs import RunRegistry
from service.state.base import RunStore
from service.state.sqlite_runs import FILE as RUN_LOG_FILE
from service.state.sqlite_runs import SqliteRunLog
from tools import load_tools
from tools.base import Tool

if TYPE_CHECKING:
    from service.http.server import HttpServer

log = logging.getLogger(__name__)


async def start(
    config: Config,
    *,
    metrics: bool = True,
    tools: dict[str, Tool[Any]] | None = None,
    model: Model | None = None,
    worker: int | None = None,
) -> Service:
    """Build the service from `config` and start serving. `tools` and `model` replace the ones the config describes
    (tests pass their own); `worker`: this process's index under --workers N."""
    make_data_dir(config)
    tools = build_tools(config) if tools is None else tools
    warn_unavailable(tools)
    model = build_model(config) if model is None else model
    telemetry.setup_tracing()  # only when the OTEL_* environment asks for it; a no-op tracer otherwise
    records = build_records(config)
    await records.open()  # PostgreSQL: connected and migrated, or (unreachable) records spool until it answers
    executor = build_executor(tools, config, records)
    loop = AgentLoop(model, executor, retry=config.model.retry)
    health = HealthReport(STATE_HEALTH)
    store = await build_run_store(config, health)
    # run summaries answer GetRun after the live state forgot a run: for the fleet when they are in PostgreSQL (a
    # process's own SQLite file would answer for its own runs only, and memory:// keeps today's behaviour)
    # (`runs.keep_summaries` asks for them in the SQLite file too: one node whose GetRun and ListRuns outlive retention)
    keep = config.runs.keep_summaries
    summaries = records.summaries if (config.records.url is not None if keep is None else keep) else None
    runlog = None if store is not None else build_run_log(config)  # one node: durable runs' events on disk
    kept = store if store is not None else runlog
    checkpoints = build_checkpoints(config, worker=worker)
    flush = None if runlog is None else runlog.flush
    queue = config.durable.queue == "store" or (config.durable.queue == "auto" and config.records.url is not None)
    if runlog is not None:
        runlog.store_queue = queue
    if runlog is not None and isinstance(checkpoints, SqliteCheckpointStore):
        runlog.join(checkpoints)  # one file, one transaction: each checkpoint commits with the events before it
        flush = None
    durable = DurableRuns(
        checkpoints, config.runs, shared=kept, flush=flush, durable=config.durable, queue=queue, one_node=store is None
    )
    limits = CallerLimits()  # the registry counts the runs it resumes after a restart in them too
    registry = RunRegistry(
        loop, config.runs, store=store, summaries=summaries, durable=durable, runlog=runlog, limits=limits
    )
    await durable.start(registry)  # its own runs from before a restart go on at once, a dead peer's when found
    authenticator = Authenticator(config.auth)
    push = build_push(config, records, registry)
    api = AgentApi(
        registry,
        tools,
        config,
        caller_limits=limits,
        tool_specs=loop.tool_specs,
        default_model=model.default_model,
        one_model=isinstance(model, ScriptedModel),  # it plays its scenario whatever model a request names
        push=push,
    )
    deliveries = Deliveries(registry, frozenset(config.approvals.approvers))
    servicer = AgentServicer(api, anonymous=authenticator.anonymous, deliveries=deliveries)
    http = build_http(api, authenticator, config) if config.http_listen else None
    service = await start_server(
        config,
        servicer,
        interceptors=[AuthInterceptor(authenticator), RejectUndecodable(), *tracing_interceptors()],
        registry=registry,
        model=model,
        executor=executor,
        tools=tools,
        metrics=metrics,
        http=http,
    )
    service.push = push
    await push.start()
    if store is not None:
        await health.attach(service.health, store.up)
    if records.database is not None:
        records_health = HealthReport(RECORDS_HEALTH)
        records.database.on_health = records_health.changed_soon
        await records_health.attach(service.health, records.database.up)
        quarantine_health = HealthReport(RECORDS_QUARANTINE_HEALTH)
        records.database.on_quarantine = lambda count: quarantine_health.changed_soon(count == 0)
        await quarantine_health.attach(service.health, records.database.quarantined == 0)
    return service


def build_push(config: Config, records: Records, registry: RunRegistry) -> Pusher:
    """Completion push: deliveries in the records store (PostgreSQL with `records.url`, else data_dir/push.db),
    scheduled when a run driven here ends."""
    if records.database is not None:
        from service.push.pg_store import PgDeliveryStore  # psycopg only when the config asks for PostgreSQL

        store: DeliveryStore = PgDeliveryStore(records.database)
    else:
        store = SqliteDeliveryStore(config.data_dir / PUSH_FILE)
    push = Pusher(
        store,
        UrlGuard(config.push),
        config.push,
        lookup=registry.record,
        max_wait_for_run_s=config.runs.max_run_s + config.runs.retention_s,
    )
    registry.on_end(push.ended)
    return push


def build_http(api: AgentApi, authenticator: Authenticator, config: Config) -> HttpServer:
    """The HTTP face, its socket bound here, before the gRPC server starts: a port in use fails the start before
    anything serves."""
    # imported here: a service without `http_listen` loads nothing of Starlette or uvicorn
    from service.http.app import HttpFace
    from service.http.server import HttpServer

    return HttpServer(HttpFace(api, authenticator, config).app(), config)


async def build_run_store(config: Config, health: HealthReport) -> RunStore | None:
    """The shared run-state store `state.url` names; None for memory:// (the registry keeps runs in this process)."""
    if not config.state.shared:
        return None
    # imported here: a memory:// service loads nothing of redis (and runs where its client is not installed)
    from service.state.redis_runs import RedisRunStore

    store = RedisRunStore(
        config.state, retention_s=config.runs.retention_s, max_run_s=config.runs.max_run_s, on_health=health.changed
    )
    await store.start()
    return store


def build_model(config: Config) -> Model:
    """Claude when configured (or when auto and ANTHROPIC_API_KEY is set), else the offline scripted model."""
    provider = config.model.provider
    if provider == "auto":
        provider = "anthropic" if os.environ.get("ANTHROPIC_API_KEY") else "scripted"
    if provider == "anthropic":
        from service.models.anthropic import AnthropicModel

        return AnthropicModel(
            default_model=config.model.name,
            timeout_s=config.model.timeout_s,
            idle_timeout_s=config.model.idle_timeout_s,
            turn_timeout_s=config.model.turn_timeout_s,
            thinking_budget=config.model.thinking_budget,
            adaptive_thinking=config.model.thinking == "adaptive",
            effort=config.model.effort,
        )
    scenario = Scenario.from_file(config.model.scenario) if config.model.scenario else Scenario.demo()
    return ScriptedModel(scenario, pacing=config.model.pacing)


def make_data_dir(config: Config) -> None:
    """Private to the service when made here (0700): it holds the audit log and the dead letters. A folder that is
    already there keeps its mode (a volume's is the platform's); the databases in it are 0600 (records/sqlite.py).
    One that cannot be made or written stops the start saying which folder and what to do."""
    folder = config.data_dir
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    except OSError as exc:
        raise OSError(
            f"data_dir {str(folder.absolute())!r} cannot be made or written ({exc.strerror}): set AGENT_DATA_DIR, "
            "or data_dir in the config, to a folder this user may write"
        ) from exc


def build_tools(config: Config) -> dict[str, Tool[Any]]:
    make_data_dir(config)
    return load_tools(config.data_dir, config.tools, extra_modules=config.tool_modules)


def warn_unavailable(tools: Mapping[str, Tool[Any]]) -> None:
    for name, tool in tools.items():
        if tool.unavailable:
            log.warning(
                "tool %s is unavailable on this server and left out of ListTools: %s",
                name,
                tool.unavailable,
                extra={"tool": name},
            )


def build_executor(tools: Mapping[str, Tool[Any]], config: Config, records: Records | None = None) -> Executor:
    """The executor a server runs: policies resolved from the tools and `policies`, the record stores (`records`, by
    default `build_records`'s), and the config's redaction, installed process-wide (the stores use that one)."""
    policies = resolve(tools, config.policies)
    redactor = Redactor.from_config(config.redaction)
    redact.install(redactor)  # logging is process-wide: the JSON log formatter masks with the same redactor
    records = build_records(config) if records is None else records
    return Executor(
        tools,
        timeout_s=config.limits.tool_timeout_s,
        policies=policies,
        audit=records.audit,
        dead_letter=records.dead_letter,
        redactor=redactor,
        shared=build_shared_policy(config),
        approvals=build_approvals(config, records, tools),
    )


def build_approvals(config: Config, records: Records, tools: Mapping[str, Tool[Any]]) -> Approvals | None:
    """The approval policy, when any tool or caller asks for approvals (else the executor skips the step). A name
    that is no tool is refused at start, as `policies` are: a typo must not leave a tool without its approvals."""
    callers = {c.name: c for c in [*config.auth.callers, config.auth.anonymous]}
    named = {*config.approvals.tools, *(t for c in callers.values() for t in c.require_approval)}
    if named - set(tools):
        raise PolicyError(f"approvals name unknown tools: {', '.join(sorted(named - set(tools)))}")
    if not config.approvals.tools and not any(c.require_approval for c in callers.values()):
        return None
    return Approvals(config.approvals, callers, audit=records.audit)


def build_records(config: Config) -> Records:
    """The audit log, dead letters and run summaries: in PostgreSQL when `records.url` is set (one chain and one
    table for every replica, spooled under data_dir while it is away), else SQLite files under data_dir. They redact
    with the process-wide redactor (`build_executor` installs the config's)."""
    audit_path = sqlite_path(config.audit, config.data_dir, AUDIT_FILE)
    require_given_key(config.records.url, config.audit.key_file)
    keyring = load_keyring(config.audit.key_file, audit_path)
    retention_s = None if config.dead_letter.retention_days is None else config.dead_letter.retention_days * 86400
    if config.records.url is None:
        return Records(
            audit=AuditLog(
                audit_path,
                keyring=keyring,
                queue_size=config.audit.queue_size,
                head_log_interval_s=config.audit.head_log_interval_s,
            ),
            dead_letter=DeadLetterStore(
                sqlite_path(config.dead_letter, config.data_dir, DEAD_LETTER_FILE), retention_s=retention_s
            ),
            summaries=SqliteRunSummaryStore(config.data_dir / SUMMARIES_FILE),
        )
    from service.records.pg_audit import PgAuditLog  # psycopg only when the config asks for PostgreSQL
    from service.records.pg_deadletter import PgDeadLetterStore
    from service.records.pg_summaries import PgRunSummaryStore
    from service.records.postgres import PgRecords

    database = PgRecords(
        config.records.url,
        spool_path=config.data_dir / SPOOL_FILE,
        pool_min=config.records.pool_min,
        pool_max=config.records.pool_max,
        timeout_s=config.records.timeout_s,
    )
    return Records(
        audit=PgAuditLog(
            database,
            keyring=keyring,
            queue_size=config.audit.queue_size,
            head_log_interval_s=config.audit.head_log_interval_s,
        ),
        dead_letter=PgDeadLetterStore(database, retention_s=retention_s),
        summaries=PgRunSummaryStore(database),
        database=database,
    )


def build_run_log(config: Config) -> SqliteRunLog:
    """The durable runs' records and events on one node (memory:// run state): in data_dir/durable.db once joined
    to the SQLite checkpoint store (`start`), else data_dir/runs.db, opened when first used."""
    return SqliteRunLog(
        config.data_dir / RUN_LOG_FILE,
        retention_s=config.runs.retention_s,
        max_run_s=config.runs.max_run_s,
        synchronous=config.durable.sqlite_synchronous,
    )


def build_checkpoints(config: Config, *, worker: int | None = None) -> CheckpointStore:
    """The durable runs' checkpoint store, not yet open: in the PostgreSQL records database with `records.url` (a
    fleet: dead peers' runs are recovered), else a SQLite file under data_dir (one node: its own runs after a
    restart). Owned by this process's executor id (`worker`: its index under --workers N, each needs its own)."""
    owner = executor_id(config.data_dir, config.durable.executor_id, worker=worker)
    if config.records.url is None:
        return SqliteCheckpointStore(
            config.data_dir / DURABLE_FILE,
            owner,
            synchronous=config.durable.sqlite_synchronous,
            recover_interval_s=config.durable.recover_interval_s,
            keep_ended_s=config.durable.keep_ended_s,
        )
    from service.durable.postgres import PgCheckpointStore  # psycopg only when the config asks for PostgreSQL

    return PgCheckpointStore(
        config.records.url,
        owner,
        timeout_s=config.records.timeout_s,
        recover_interval_s=config.durable.recover_interval_s,
        keep_ended_s=config.durable.keep_ended_s,
    )


def build_shared_policy(config: Config) -> SharedPolicy | None:
    """Rate limits, fleet breakers and (with `state.shared_cache`) result caches on the shared state, when
    `state.url` names one; None on memory:// (each process its own, as before)."""
    if not config.state.shared:
        return None
    # imported here: the embedded default never loads the Redis client (nor needs what it needs, e.g. async_timeout
    # on a Python before 3.11.3)
    from service.state.redis_client import connect
    from service.state.redis_limits import RedisPolicyState

    state = RedisPolicyState(connect(config.state), config.state.prefix)
    return SharedPolicy(state, Reachability("limits", state.ping), cache=config.state.shared_cache)
