"""The records database's schema: versioned migrations applied at start, each recorded in `schema_migrations`, under
an advisory lock so that replicas starting together migrate once and never race."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import psycopg

log = logging.getLogger("service.records.postgres")

Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


# Append only: a migration that has shipped is never edited (replicas of the old version may be running it).
# Text columns rather than JSONB for input and metadata: the audit MAC covers the text as stored, byte for byte.
MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "audit log, dead letters, run summaries",
        """
        CREATE TABLE audit (
            seq BIGINT PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            run_id TEXT NOT NULL,
            metadata TEXT NOT NULL,
            tool TEXT NOT NULL,
            call_id TEXT NOT NULL,
            input TEXT NOT NULL,
            status TEXT NOT NULL,
            duration_s DOUBLE PRECISION NOT NULL,
            result_bytes BIGINT NOT NULL,
            attempts INTEGER NOT NULL,
            cache_hit INTEGER NOT NULL,
            answered_by TEXT NOT NULL,
            trace_id TEXT NOT NULL,
            record_id TEXT NOT NULL UNIQUE,
            prev_hash TEXT NOT NULL,
            hash TEXT NOT NULL,
            key_id TEXT
        );
        CREATE INDEX audit_run ON audit (run_id);
        CREATE TABLE audit_head (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            seq BIGINT NOT NULL,
            hash TEXT NOT NULL,
            key_id TEXT,
            mac TEXT
        );
        CREATE TABLE dead_letters (
            execution_id TEXT PRIMARY KEY,
            created_at DOUBLE PRECISION NOT NULL,
            run_id TEXT NOT NULL,
            call_id TEXT NOT NULL,
            tool TEXT NOT NULL,
            input TEXT NOT NULL,
            status TEXT NOT NULL,
            error_type TEXT NOT NULL,
            message TEXT NOT NULL,
            traceback TEXT NOT NULL,
            attempts INTEGER NOT NULL,
            trace_id TEXT NOT NULL
        );
        CREATE INDEX dead_letters_created ON dead_letters (created_at);
        CREATE INDEX dead_letters_tool ON dead_letters (tool, created_at);
        CREATE TABLE run_summaries (
            run_id TEXT PRIMARY KEY,
            caller TEXT NOT NULL,
            state TEXT NOT NULL,
            last_seq BIGINT NOT NULL,
            created_ns BIGINT NOT NULL,
            ended_ns BIGINT NOT NULL,
            outcome TEXT,
            trace_id TEXT NOT NULL
        );
        CREATE INDEX run_summaries_ended ON run_summaries (ended_ns);
        """,
    ),
    # service/durable/postgres.py; JSON as text in `request` and `value`, in the version `format` says
    Migration(
        2,
        "durable runs and their checkpoints",
        """
        CREATE TABLE durable_runs (
            run_id TEXT PRIMARY KEY,
            owner TEXT NOT NULL,
            state TEXT NOT NULL,
            caller TEXT NOT NULL,
            background BOOLEAN NOT NULL,
            request TEXT NOT NULL,
            format SMALLINT NOT NULL DEFAULT 1,
            created TIMESTAMPTZ NOT NULL DEFAULT now(),
            updated TIMESTAMPTZ NOT NULL DEFAULT now()
        );
        CREATE INDEX durable_runs_running ON durable_runs (owner) WHERE state = 'running';
        CREATE TABLE run_steps (
            run_id TEXT NOT NULL,
            step_no INTEGER NOT NULL,
            kind TEXT NOT NULL,
            key TEXT NOT NULL,
            seq BIGINT NOT NULL,
            value TEXT NOT NULL,
            format SMALLINT NOT NULL DEFAULT 1,
            PRIMARY KEY (run_id, step_no)
        );
        """,
    ),
    # the durable queue of SubmitRun runs (service/durable/pg_queue.py): queued rows, oldest first by queue_seq
    Migration(
        3,
        "the durable queue of SubmitRun runs",
        """
        CREATE SEQUENCE durable_queue_seq;
        ALTER TABLE durable_runs ADD COLUMN queue_seq BIGINT;
        CREATE INDEX durable_runs_queued ON durable_runs (queue_seq) WHERE state = 'queued';
        """,
    ),
    # ListRuns (service/listing.py) and completion push (service/push/): times in ns since the epoch
    Migration(
        4,
        "run listing and callback deliveries",
        """
        CREATE INDEX run_summaries_caller ON run_summaries (caller, created_ns, run_id);
        CREATE TABLE callback_deliveries (
            delivery_id TEXT PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            caller TEXT NOT NULL,
            url TEXT NOT NULL,
            secret TEXT NOT NULL,
            state TEXT NOT NULL,
            body TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            created_ns BIGINT NOT NULL,
            ended_ns BIGINT NOT NULL DEFAULT 0,
            next_ns BIGINT NOT NULL DEFAULT 0,
            lease_ns BIGINT NOT NULL DEFAULT 0,
            last_error TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX callback_deliveries_due ON callback_deliveries (next_ns) WHERE state = 'pending';
        CREATE INDEX callback_deliveries_waiting ON callback_deliveries (created_ns) WHERE state = 'waiting';
        """,
    ),
    # ended durable runs' checkpoints are deleted after durable.keep_ended_s (service/durable/postgres.py, prune)
    Migration(
        5,
        "ended durable runs, oldest first",
        """
        CREATE INDEX durable_runs_ended ON durable_runs (updated) WHERE state NOT IN ('running', 'queued');
        """,
    ),
)


def advisory_key(name: str) -> str:
    """SQL for a 64-bit advisory-lock key private to the current schema (advisory locks are database-wide, and
    several services, or tests, may share a database under different schemas)."""
    return f"hashtextextended(current_schema() || '.{name}', 0)"


async def migrate(conn: Conn) -> list[int]:
    """Apply the migrations this database lacks, in one transaction under an advisory lock; the versions applied.
    A second replica starting at the same moment waits for the lock, then finds nothing left to do."""
    async with conn.transaction():
        await conn.execute(f"SELECT pg_advisory_xact_lock({advisory_key('agent-records-migrations')})")
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
            "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        cursor = await conn.execute("SELECT version FROM schema_migrations")
        done = {int(row[0]) for row in await cursor.fetchall()}
        applied = []
        for migration in MIGRATIONS:
            if migration.version in done:
                continue
            await conn.execute(migration.sql.encode())  # no parameters: several statements in one go
            await conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (%s, %s)", (migration.version, migration.name)
            )
            applied.append(migration.version)
    newest = max(done, default=0)
    if newest > MIGRATIONS[-1].version:
        log.warning(
            "the records database was migrated by a newer version; this one uses the tables it knows",
            extra={"schema_version": newest, "known_version": MIGRATIONS[-1].version},
        )
    if applied:
        log.info("records database migrated", extra={"applied": applied})
    return applied
