"""The real Redis and PostgreSQL of the development and CI machines, for the shared-state and shared-records tests.

Each test gets its own namespace: a Redis key prefix (its keys are deleted after it) and a PostgreSQL schema (dropped
after it), so tests never see each other's state and can run against a server other things use. Without the servers
(a laptop) these tests are skipped; under CI (`AGENT_REQUIRE_BACKENDS=1`, set by `.ci/run`, which starts the servers)
a missing server fails them instead, so they can never pass by not running.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

REDIS_URL = os.environ.get("AGENT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("AGENT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


def _answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _need(name: str, host: str, port: int) -> None:
    if _answers(host, port):
        return
    why = f"{name} does not answer on {host}:{port}"
    if os.environ.get("AGENT_REQUIRE_BACKENDS") == "1":
        pytest.fail(f"{why}, and AGENT_REQUIRE_BACKENDS=1 (CI) says its tests must run")
    pytest.skip(why)


@dataclass(frozen=True)
class RedisNamespace:
    url: str
    prefix: str  # every key the test makes starts with it


@dataclass(frozen=True)
class PostgresSchema:
    url: str  # a libpq URL whose connections use the test's schema first (search_path)
    schema: str


@pytest.fixture
async def redis_ns() -> AsyncIterator[RedisNamespace]:
    import redis.asyncio as redis

    _need("Redis", "127.0.0.1", 6379)
    ns = RedisNamespace(REDIS_URL, f"test:{secrets.token_hex(6)}:")
    yield ns
    client = redis.Redis.from_url(ns.url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{ns.prefix}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture
def postgres_schema() -> Iterator[PostgresSchema]:
    import psycopg

    _need("PostgreSQL", "127.0.0.1", 5432)
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    sep = "&" if "?" in POSTGRES_URL else "?"
    yield PostgresSchema(f"{POSTGRES_URL}{sep}options={quote(f'-csearch_path={schema}')}", schema)
    with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA {schema} CASCADE")


# One audit key for every process of a test's fleet: with records on PostgreSQL the service refuses to start without
# one given (docs/audit.md#on-postgresql).
AUDIT_KEYS = "fleet-1:" + "5" * 64


def audit_key_file(folder: Path, text: str = AUDIT_KEYS) -> Path:
    """A key file (0600) with `text`, in `folder`: the `audit.key_file` of a service on PostgreSQL records."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"audit-{secrets.token_hex(3)}.key"
    path.write_text(text + "\n")
    path.chmod(0o600)
    return path
