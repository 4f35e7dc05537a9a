"""Where a shared run lives in Redis, for how long, and how its record and events are written there and read back.

Keys, all under `state.prefix`:

    run:{id}                hash: caller, state, owner, created_ns, ended_ns, fingerprint, key, last_seq, outcome,
                            cancel_requested, durable (0 or 1)
    run:{id}:events         stream: one entry per shipment of a run's new events, id 0-<last seq> (redis_ship.py);
                            the record's last_seq is written when the state changes, the stream's last id is current
    idem:{caller}:{key}     the run id an idempotency key names (SET NX, in the admission script)
    caller:{name}:active    sorted set: the caller's runs in progress, scored by lease expiry (ms, Redis's clock)
    caller:{name}:starts    sorted set: the caller's starts of the last minute, scored by start time
    caller:{name}:runs      sorted set: the caller's runs still kept, scored by creation (µs): ListRuns' index
    run-control:{instance}  pub/sub channel of the process that drives a run: "<run id> now|after_turn", or
                            "<run id> interact <reply key> <json>" for an approval, input or tool cancel
    reply:{token}           list: the driving process's answer to one such message (expires after 30 s)

A run ending sets `runs.retention_s` TTLs on its hash, stream and key; until then they carry `runs.max_run_s` more, so
that the runs of a process that died are forgotten too.
"""

from __future__ import annotations

import json
from typing import Any

from service import codec
from service import events as ev
from service.run import Entry, Run, RunRecord


class Layout:
    """The keys of this store (`prefix`) and the record fields this process (`instance`) writes."""

    def __init__(self, prefix: str, instance: str, *, retention_s: float, live_ttl_s: int) -> None:
        self.prefix = prefix
        self.instance = instance
        self.retention_s = retention_s
        self.live_ttl_s = live_ttl_s

    def run_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}"

    def events_key(self, run_id: str) -> str:
        return f"{self.prefix}run:{run_id}:events"

    def idem_key(self, caller: str, key: str) -> str:
        return f"{self.prefix}idem:{caller}:{key}"

    def caller_key(self, caller: str, what: str) -> str:
        return f"{self.prefix}caller:{caller}:{what}"

    def reply_key(self, token: str) -> str:
        return f"{self.prefix}reply:{token}"

    def channel(self, instance: str) -> str:
        return f"{self.prefix}run-control:{instance}"

    @staticmethod
    def state_of(run: Run, *, ended: bool) -> str:
        """The state a record says: a run whose last events are not all shipped yet is still running there."""
        return run.state.value if ended or not run.finished else "running"

    def fields_of(self, run: Run, last_seq: int, *, ended: bool) -> dict[Any, Any]:
        """The hash fields a shipment writes; the full record, so that a Redis restarted empty gets it back."""
        fields: dict[Any, Any] = {
            "caller": run.caller,
            "state": self.state_of(run, ended=ended),
            "owner": self.instance,
            "created_ns": run.created_ns,
            "fingerprint": run.fingerprint,
            "key": run.idempotency_key,
            "last_seq": last_seq,
            # a run that is not durable is continued nowhere if this process dies: its record then reads as failed
            # once the lease is gone (redis_remote.RemoteRuns._as_left)
            "durable": int(run.spec.durable),
        }
        if ended:
            fields["ended_ns"] = run.ended_ns
            outcome = run.outcome
            if outcome is not None:
                fields["outcome"] = codec.dumps(outcome).decode()
        return fields

    def ship_keys(self, run: Run) -> tuple[str, str, str, str]:
        """The keys a shipment of `run` may write (`redis_ship.SHIP`): its hash and stream, its caller's active set and
        run index."""
        prefix = f"{self.prefix}run:{run.id}"
        caller = f"{self.prefix}caller:{run.caller}:"
        return prefix, prefix + ":events", caller + "active", caller + "runs"


def stream_entries(answer: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of an XREAD of one stream: a list of [key, entries] pairs (RESP2), a map (RESP3), or None."""
    if not answer:
        return []
    if isinstance(answer, dict):
        return list(next(iter(answer.values()))[0])
    return list(answer[0][1])


def stream_entries_by_key(answer: Any) -> list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]:
    """The entries of an XREAD of several streams, by stream key, in either protocol's shape (see above)."""
    if not answer:
        return []
    if isinstance(answer, dict):
        return [(key, list(value[0])) for key, value in answer.items()]
    return [(key, list(entries)) for key, entries in answer]


def log_entries(fields: dict[bytes, bytes]) -> list[Entry]:
    """The log entries one stream entry carries (see `redis_ship`)."""
    first = int(fields[b"f"])
    times = fields[b"t"].split(b",")
    events = json.loads(fields[b"e"])
    return [
        Entry(first + i, int(stamp), codec.from_dict(event))
        for i, (stamp, event) in enumerate(zip(times, events, strict=True))
    ]


def run_record(run_id: str, fields: dict[bytes, bytes]) -> RunRecord:
    """A run's record from its hash."""

    def text(name: str) -> str:
        return fields.get(name.encode(), b"").decode()

    outcome = codec.loads(fields[b"outcome"]) if b"outcome" in fields else None
    return RunRecord(
        run_id,
        text("caller"),
        text("state") or "queued",
        int(text("last_seq") or 0),
        int(text("created_ns") or 0),
        int(text("ended_ns") or 0),
        outcome if isinstance(outcome, ev.FinalResponse | ev.RunFailed) else None,
        text("fingerprint"),
        text("owner"),
    )
