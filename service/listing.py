"""ListRuns: a caller's runs, newest first, gathered from every place a run may be and merged, each run once.

Paging is a keyset on (created_ns, run_id), descending: a page token names the last run of the page before, and the
next page is the runs strictly older than it. Runs started meanwhile are newer, so they never shift a page nor make
a run appear twice. Each source (this process's runs, the shared run state, the run summaries) answers the same
query; `merge` keeps the newest `limit` of their union, one record per run, preferring a finished one (a summary may
be written before the shared record says the run ended, or after).
"""

from __future__ import annotations

import base64
import binascii
import heapq
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from service.errors import InvalidRequest
from service.run import RunRecord

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500
_TOKEN_PREFIX = "v1."

Key = tuple[int, str]  # (created_ns, run_id): a run's place in the listing


@dataclass(frozen=True, slots=True)
class RunQuery:
    """One caller's runs in `states` (all when empty), older than `before` (the newest when None), `limit` at most."""

    caller: str
    states: frozenset[str]
    before: Key | None
    limit: int

    def admits(self, record: RunRecord) -> bool:
        if record.caller != self.caller or (self.states and record.state not in self.states):
            return False
        return self.before is None or (record.created_ns, record.run_id) < self.before


class RunSource(Protocol):
    async def list_runs(self, query: RunQuery) -> list[RunRecord]:
        """The runs `query` admits, newest first, at most `query.limit`."""


def newest(records: Iterable[RunRecord], query: RunQuery) -> list[RunRecord]:
    """What a source that holds its runs in memory answers."""
    return heapq.nlargest(query.limit, (r for r in records if query.admits(r)), key=key_of)


def key_of(record: RunRecord) -> Key:
    return record.created_ns, record.run_id


def merge(pages: Sequence[list[RunRecord]], limit: int) -> tuple[list[RunRecord], bool]:
    """The newest `limit` runs of the sources' answers (each asked for `limit + 1`), one record per run, and whether
    more runs follow. A run found in several sources keeps the first finished record, else the first found."""
    chosen: dict[str, RunRecord] = {}
    for page in pages:
        for record in page:
            held = chosen.get(record.run_id)
            if held is None or (record.finished and not held.finished):
                chosen[record.run_id] = record
    ordered = sorted(chosen.values(), key=key_of, reverse=True)
    return ordered[:limit], len(ordered) > limit


def page_size(requested: int) -> int:
    if requested < 0:
        raise InvalidRequest(f"page_size must not be negative, got {requested}")
    if requested > MAX_PAGE_SIZE:
        raise InvalidRequest(f"page_size is at most {MAX_PAGE_SIZE}, got {requested}")
    return requested or DEFAULT_PAGE_SIZE


def encode_token(key: Key) -> str:
    raw = f"{key[0]}:{key[1]}".encode()
    return _TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str) -> Key | None:
    """The key a page token names; None for an empty token (the first page). Opaque to callers: anything else is
    refused as a token this server did not give."""
    if not token:
        return None
    bad = InvalidRequest("page_token is not one this server gave: pass next_page_token unchanged, or none")
    if not token.startswith(_TOKEN_PREFIX) or len(token) > 200:
        raise bad
    body = token.removeprefix(_TOKEN_PREFIX)
    try:
        created, _, run_id = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode().partition(":")
        key = int(created), run_id
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise bad from None
    # a key no run has: the stores compare it as a 64-bit integer and text (SQLite raises OverflowError past 2**63,
    # PostgreSQL refuses a NUL in text), so a forged one must not reach them
    if not (0 <= key[0] < 2**63 and run_id.isprintable()):
        raise bad
    return key
