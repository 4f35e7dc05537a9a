"""Where records and runs are kept: the stores' URLs and the run lifecycle."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from service.config.base import Section


class StoreConfig(Section):
    """Where a durable store lives: `sqlite:///PATH` (relative paths under the working directory); unset means
    `<data_dir>/<default file>`. A URL so that a shared backend (PostgreSQL) can be chosen here later."""

    url: str | None = Field(default=None, description="sqlite:///PATH; unset: the default file under data_dir")
    queue_size: int = Field(
        default=10000,
        ge=1,
        description="records buffered for the audit log's background writer; when it falls that far behind, a "
        "finishing tool call waits for it (the event loop does not, and no record is dropped); unused by dead_letter",
    )


class AuditConfig(StoreConfig):
    """The audit log's store, the keys that sign its rows (docs/audit.md) and how often its head is logged."""

    key_file: Path | None = Field(
        default=None,
        description="file of ID:SECRET keys, the last one signing new rows; AGENT_AUDIT_KEY overrides it; unset: "
        "audit.key beside the database, generated on the first start",
    )
    head_log_interval_s: float | None = Field(
        default=300.0, gt=0, description="log the chain's head this often when it moved (also at start and close)"
    )


class DeadLetterConfig(StoreConfig):
    """The dead-letter store: tool calls that finally failed, with input, error and traceback."""

    retention_days: float | None = Field(
        default=30.0, gt=0, description="dead letters older than this are deleted (at start, then hourly); null: kept"
    )


class RunsConfig(Section):
    """Run lifecycle: retention, background queue, coalescing and slow-subscriber limits."""

    retention_s: float = Field(default=900.0, gt=0, description="how long an ended run stays watchable")
    max_retained_runs: int = Field(default=10_000, ge=1, description="how many ended runs stay watchable")
    max_retained_bytes: int = Field(
        default=256 * 2**20,
        ge=2**20,
        description="ended runs' logs (tool data as JSON, text, ~200 bytes an event) past this total: the oldest "
        "ended runs are forgotten first",
    )
    max_event_data_bytes: int = Field(
        default=256 * 1024,
        ge=1024,
        le=512 * 1024,
        description="tool data whose JSON text is larger goes in tool_data_part events of at most this many bytes "
        "(as a protobuf Value, data can take 5 times its JSON size: this keeps every event under 3 MiB)",
    )
    max_events_per_run: int = Field(default=100_000, ge=10, description="largest event log of one run")
    max_run_s: float = Field(default=3600.0, gt=0, description="longest a run may take, whatever the deadline")
    min_tool_budget_s: float = Field(default=0.05, ge=0, description="no tool call starts with less time left")
    deadline_margin_s: float = Field(
        default=0.05,
        ge=0,
        description="the run ends this much before the deadline, plus the rounding of the caller's timeout on the wire",
    )
    deadline_busy_margin_s: float = Field(
        default=0.15,
        ge=0,
        description="on a busy event loop the run ends up to this much earlier still (none at half a core, all of it "
        "saturated; at most a quarter of what is left): the error event then waits behind other calls' work",
    )
    background_max_concurrent: int = Field(default=8, ge=1, description="SubmitRun runs running at once")
    background_max_queued: int = Field(
        default=100, ge=0, description="SubmitRun runs waiting; beyond it RESOURCE_EXHAUSTED"
    )
    coalesce_window_s: float = Field(default=0.01, ge=0, description="text deltas this close together are merged")
    coalesce_max_window_s: float = Field(
        default=0.1,
        ge=0,
        description="as the event loop nears saturation the window widens, up to this (never below the window)",
    )
    coalesce_max_bytes: int = Field(default=1024, ge=1, description="largest merged text delta")
    subscriber_coalesce_lag: int = Field(default=64, ge=1, description="a stream this far behind gets merged deltas")
    subscriber_max_lag: int = Field(default=10_000, ge=1, description="a stream this far behind is dropped")
    max_tool_calls: int = Field(default=200, ge=1, description="largest max_tool_calls a request may ask for")
    max_output_tokens: int = Field(default=1_000_000, ge=1, description="largest max_output_tokens")
    keep_summaries: bool | None = Field(
        default=None,
        description="write each ended run's summary to the records store, so that GetRun and ListRuns answer for it "
        "after `retention_s`; unset: only when records.url is set (the SQLite file costs a synced write per run)",
    )


class StateConfig(Section):
    """Where live run state is shared: run records and event logs, idempotency keys, caller quotas, rate limits,
    breakers and (optionally) the result cache. `memory://` keeps it in this process (one replica); `redis://` shares
    it between replicas and workers (docs/operations.md#replicas)."""

    url: str = Field(
        default="memory://",
        description="memory:// (one process) or redis://[:PASSWORD@]HOST:PORT/DB (rediss:// for TLS)",
    )
    prefix: str = Field(
        default="agent:", min_length=1, description="prefix of every Redis key, so several services can share one"
    )
    password_file: Path | None = Field(
        default=None, description="file holding the Redis password (rather than in the URL, which logs may show)"
    )
    tls_ca_file: Path | None = Field(
        default=None, description="rediss://: CA bundle that signs the server's certificate"
    )
    tls_cert_file: Path | None = Field(default=None, description="rediss://: client certificate, if the server asks")
    tls_key_file: Path | None = Field(default=None, description="rediss://: the client certificate's key")
    timeout_s: float = Field(
        default=2.0, gt=0, description="connect and command timeout; beyond it the store counts as unreachable"
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="Redis connections a process keeps at most per client; past it a command waits up to timeout_s "
        "for one rather than failing",
    )
    shared_cache: bool = Field(
        default=False, description="with redis://, tools' result caches are shared by the fleet rather than per process"
    )
    lease_s: float = Field(
        default=30.0,
        ge=1,
        le=3600,
        description="a run's lease on its caller's concurrency, renewed by its process every third of it: a dead "
        "process's runs free their slots, and their watchers elsewhere are told, this long after it stopped at most",
    )
    probe_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often a process sees whether its leases are due (every lease_s / 3) and pings a store it "
        "lost; at most lease_s / 3",
    )
    ship_linger_s: float = Field(
        default=0.005,
        ge=0,
        le=1,
        description="a shipment to Redis waits this long for more events after the first: a round costs ~0.3 ms of "
        "CPU whatever it carries; watchers on other replicas see events this much later",
    )
    read_block_s: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="one blocking XREAD of the watched streams waits this long; a stream quiet this long has its "
        "driver's lease checked",
    )
    record_wait_s: float = Field(
        default=1.0,
        ge=0,
        le=10,
        description="a run started without idempotency key or caller quota is recorded with its first events; a "
        "replica asked about an unknown run id waits this long for its record before NOT_FOUND",
    )

    @property
    def shared(self) -> bool:
        return not self.url.startswith("memory://")

    @model_validator(mode="after")
    def _known_scheme(self) -> StateConfig:
        if not self.url.startswith(("memory://", "redis://", "rediss://", "unix://")):
            raise ValueError(f"state.url {self.url!r}: memory://, redis://, rediss:// or unix:// (a Redis socket)")
        if self.probe_s > self.lease_s / 3:
            raise ValueError(
                f"state.probe_s {self.probe_s:g} is more than a third of state.lease_s {self.lease_s:g}: the probe "
                "renews the leases, every third of a lease, so that one missed renewal does not lose them"
            )
        return self


class RecordsConfig(Section):
    """Where the durable records go when they are shared: the audit log (one chain for every writer), dead letters
    and run summaries. Unset: the SQLite files of `audit` and `dead_letter` (one process)."""

    url: str | None = Field(
        default=None,
        description="postgresql://USER@HOST:PORT/DB (libpq URL; password from PGPASSWORD or a .pgpass file); unset: "
        "SQLite under data_dir",
    )
    pool_min: int = Field(default=1, ge=0, description="connections the pool keeps open")
    pool_max: int = Field(default=8, ge=1, description="most connections the pool opens")
    timeout_s: float = Field(
        default=5.0, gt=0, description="waiting for a connection; beyond it the store is unreachable"
    )

    @model_validator(mode="after")
    def _known_scheme(self) -> RecordsConfig:
        if self.url is not None and not self.url.startswith(("postgresql://", "postgres://")):
            raise ValueError(f"records.url {self.url!r}: postgresql://… (unset for the SQLite files)")
        return self


class DurableConfig(Section):
    """Durable runs' checkpoints (docs/decisions/0001-durable-execution-engine.md): in the records database, so in
    PostgreSQL with `records.url`, else a SQLite file under data_dir (one node)."""

    executor_id: str | None = Field(
        default=None,
        description="this process's name as the owner of the durable runs it drives (AGENT_EXECUTOR_ID; e.g. a "
        "StatefulSet's pod name); unset: one made on the first start and kept in data_dir, so a restarted process "
        "continues its own runs; never the same for two live processes",
    )
    recover_interval_s: float = Field(
        default=1.0,
        gt=0,
        le=60,
        description="how often each process looks for runs to continue: those of a peer found dead (its advisory lock "
        "free), and those a draining peer handed over (also announced at once)",
    )
    queue: Literal["auto", "store", "process"] = Field(
        default="auto",
        description="where durable SubmitRun runs wait for a slot: store, in the checkpoint store (the fleet's queue "
        "in PostgreSQL; on one node the SQLite file, GetRun then shows positions); process, in this process's queue "
        "(runs.background_max_queued); auto: store with records.url, else process",
    )
    queue_max: int = Field(
        default=10_000,
        ge=0,
        description="durable SubmitRun runs waiting in the checkpoint store's queue, for the whole fleet (one node: "
        "this process); beyond it RESOURCE_EXHAUSTED",
    )
    queue_max_running: int | None = Field(
        default=None,
        ge=1,
        description="durable SubmitRun runs running at once in the whole fleet (each process also keeps to "
        "runs.background_max_concurrent); unset: no fleet-wide cap",
    )
    queue_poll_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="how often each process looks at the durable queue when nothing woke it (PostgreSQL NOTIFY or "
        "a slot freed here wake it at once): the safety net for a lost notification",
    )
    keep_ended_s: float | None = Field(
        default=3600.0,
        gt=0,
        description="an ended run's checkpoints (its request and recorded steps, ~10 KB a run) are deleted this long "
        "after it ended (each process looks once a minute); null: kept for good",
    )
    sqlite_synchronous: Literal["NORMAL", "FULL"] = Field(
        default="NORMAL",
        description="SQLite checkpoints: NORMAL survives a kill of the process, FULL also a power cut (an fsync per "
        "batch)",
    )
