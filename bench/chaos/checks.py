"""What the chaos harness asserts once the runs are over, from what it saw rather than from the service's word:

- every run reached a terminal state, and it is SUCCEEDED (the model and the tools never fail here: a run that
  failed or was lost failed because of a crash);
- every run's log is gapless 1..last_seq and the same from every replica (`WatchRun(after_seq=0)`), and the seqs
  its caller was sent across its reconnections were gapless too;
- no model turn was requested again after the attempt the run recorded (the model's own count, `model.py`);
- an unsafe call (a POST) reached the upstream at most once, and one cut off by a crash is reported OUTCOME_UNKNOWN;
  no call reached the upstream that is not in its run's log (a cut-off turn's tool call never runs);
- the time from a kill to each `run_recovered` event that followed it (p50/p99), for the docs.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format

from agent.v1 import agent_pb2 as pb
from bench.chaos.clients import Seen
from bench.chaos.effects import Effects
from bench.chaos.model import MARK, ChaosModel

OUTCOME_UNKNOWN = pb.TOOL_STATUS_OUTCOME_UNKNOWN
TERMINAL = ("final_response", "error")

KINDS = {
    "lost": "a run that did not end (the fleet cannot tell, or its caller never saw an end)",
    "lost_unstarted": "a run lost before its first event: admitted, then its replica died (stopped at seq 0)",
    "failed": "a run that ended other than SUCCEEDED",
    "record_stuck": "GetRun not terminal 5 s after the run's log ended",
    "seq_rewound": "the log went back below a seq its caller had been sent (WatchRun OUT_OF_RANGE)",
    "log_gap": "a log not gapless 1..last_seq, or the caller's seqs not",
    "log_differs": "two replicas' logs of a run differ",
    "model_repeat": "a model turn requested after its recorded attempt, or two attempts kept",
    "unsafe_repeat": "an unsafe call that reached the upstream twice",
    "unsafe_unreported": "an unsafe call cut off mid-flight but not reported OUTCOME_UNKNOWN",
    "unknown_not_dead_lettered": "an OUTCOME_UNKNOWN call with no OutcomeUnknown dead letter for reconciliation",
    "unlogged_result": "a call that reached the upstream with no tool_result in its run's log",
    "harness": "something the harness did not expect (no idempotency key, a request naming no run)",
}


@dataclass
class RunLog:
    """One run as the fleet tells it after the chaos: its record and its whole log from each live replica."""

    seen: Seen
    state: int = pb.Run.STATE_UNSPECIFIED
    last_seq: int = 0
    logs: dict[str, list[pb.AgentEvent]] = field(default_factory=dict)  # replica name -> events
    problem: str = ""  # why the fleet could not tell (GetRun or WatchRun failed)
    record_lag: int = 0  # GetRun answers that were not terminal yet after WatchRun had sent the run's end

    @property
    def events(self) -> list[pb.AgentEvent]:
        return next(iter(self.logs.values()), [])


@dataclass
class Report:
    runs: int = 0
    states: dict[str, int] = field(default_factory=dict)
    kills: int = 0
    model_requests: int = 0
    turns_requested_again: int = 0  # requests for a turn the crash cut off before it was recorded: allowed
    model_after_recorded: int = 0  # requests for a turn after its recorded attempt: must be 0
    unsafe_calls: int = 0
    unsafe_max_executions: int = 0
    unsafe_interrupted: int = 0
    outcome_unknown: int = 0
    unknown_dead_lettered: int | None = None  # of those, dead-lettered as OutcomeUnknown (None: not read)
    unknown_not_sent: int = 0  # of those, calls the upstream never saw (the crash came between intent and send)
    safe_calls: int = 0
    safe_repeats: int = 0  # safe calls run more than once (allowed: at least once)
    recovered: int = 0
    resume_s: list[float] = field(default_factory=list)
    caller_breaks: int = 0
    caller_resent: int = 0  # seqs a caller was sent again after a restart (one node: ahead of the log), dropped first
    record_lags: int = 0  # runs whose GetRun trailed their log's end (not a violation: it caught up)
    violations: list[str] = field(default_factory=list)
    by_kind: dict[str, list[str]] = field(default_factory=dict)  # the same violations by kind (KINDS)

    def violate(self, kind: str, text: str) -> None:
        assert kind in KINDS, kind
        self.violations.append(text)
        self.by_kind.setdefault(kind, []).append(text)

    def figures(self) -> dict[str, Any]:
        return {
            "runs": self.runs,
            "states": self.states,
            "kills": self.kills,
            "model_requests": self.model_requests,
            "turns_requested_again": self.turns_requested_again,
            "model_requests_after_recorded_turn": self.model_after_recorded,
            "unsafe_calls": self.unsafe_calls,
            "unsafe_max_executions_per_call": self.unsafe_max_executions,
            "unsafe_interrupted": self.unsafe_interrupted,
            "outcome_unknown": self.outcome_unknown,
            "outcome_unknown_never_reached_upstream": self.unknown_not_sent,
            "outcome_unknown_dead_lettered": self.unknown_dead_lettered,
            "safe_calls": self.safe_calls,
            "safe_calls_repeated": self.safe_repeats,
            "run_recovered_events": self.recovered,
            "kill_to_resume_p50_s": _quantile(self.resume_s, 0.5),
            "kill_to_resume_p99_s": _quantile(self.resume_s, 0.99),
            "kill_to_resume_max_s": max(self.resume_s, default=None),
            "caller_stream_breaks": self.caller_breaks,
            "caller_seqs_resent": self.caller_resent,
            "runs_whose_record_trailed_the_log": self.record_lags,
            "violations": len(self.violations),
            "violations_by_kind": {kind: len(texts) for kind, texts in sorted(self.by_kind.items())},
        }


def check(
    runs: list[RunLog],
    model: ChaosModel,
    effects: Effects,
    kills: list[float],
    dead_letters: set[str] | None = None,
) -> Report:
    """`dead_letters`: the keys dead-lettered as OutcomeUnknown (None: not read, as on one node)."""
    report = Report(runs=len(runs), kills=len(kills), caller_breaks=sum(len(r.seen.breaks) for r in runs))
    report.caller_resent = sum(r.seen.resent for r in runs)
    report.record_lags = sum(r.record_lag > 0 for r in runs)
    for run in runs:
        name = pb.Run.State.Name(run.state)
        report.states[name] = report.states.get(name, 0) + 1
        _check_end(run, report)
        _check_logs(run, report)
        _check_turns(run, model, report)
        _check_resumption(run, sorted(kills), report)
    _check_effects(runs, effects, report, dead_letters)
    report.model_requests = sum(sum(t.attempts.values()) for t in model.runs.values())
    if model.unknown_requests:
        report.violate("harness", f"{model.unknown_requests} model request(s) named no chaos run")
    return report


def _check_end(run: RunLog, report: Report) -> None:
    seen = run.seen
    lost = "lost_unstarted" if "stopped at seq 0" in run.problem else "lost"
    if run.problem:
        report.violate(lost, f"{seen.label} ({seen.run_id or 'no run id'}): {run.problem}")
    elif run.state != pb.Run.SUCCEEDED:
        state = pb.Run.State.Name(run.state)
        events = run.events
        last = events[-1].WhichOneof("event") if events else "nothing"
        detail = f"GetRun last_seq {run.last_seq}; the log has {len(events)} events, the last a {last}"
        if state == "RUNNING" and last in TERMINAL:
            report.violate("record_stuck", f"{seen.label} {seen.run_id}: GetRun says RUNNING after its end ({detail})")
        else:
            report.violate("failed", f"{seen.label} {seen.run_id}: ended {state} ({seen.error or '-'}; {detail})")
    if not seen.end:
        kind = "seq_rewound" if seen.error.startswith("OUT_OF_RANGE") else lost
        report.violate(kind, f"{seen.label} {seen.run_id}: its caller saw no end ({seen.error or 'no error'})")


def _check_logs(run: RunLog, report: Report) -> None:
    seen, expected = run.seen, list(range(1, run.last_seq + 1))
    for replica, events in run.logs.items():
        covered = [s for e in events for s in range(e.first_seq or e.seq, e.seq + 1)]
        if covered != expected:
            report.violate(
                "log_gap", f"{seen.label} {seen.run_id}: log from {replica} is not 1..{run.last_seq}: {_gaps(covered)}"
            )
    bodies = {replica: canonical(events) for replica, events in run.logs.items()}
    if len({tuple(b) for b in bodies.values()}) > 1:
        report.violate(
            "log_differs", f"{seen.label} {seen.run_id}: the replicas' logs differ: {_first_difference(bodies)}"
        )
    if seen.received and seen.received != list(range(1, len(seen.received) + 1)):
        report.violate("log_gap", f"{seen.label} {seen.run_id}: its caller was sent {_gaps(seen.received)}")
    elif seen.events and run.logs:
        # what the caller was sent must be the log's start: a seq it was sent may not name another event later
        sent, logged = canonical(seen.events), next(iter(bodies.values()))
        if not _starts(logged, sent):
            bodies = {"the caller": sent, "the log": logged}
            report.violate("seq_rewound", f"{seen.label} {seen.run_id}: {_first_difference(bodies)}")


def _check_turns(run: RunLog, model: ChaosModel, report: Report) -> None:
    turns = model.runs.get(run.seen.label)
    if turns is None:
        return
    recorded = {turn: set(attempts) for turn, attempts in turns.recorded.items()}
    final = [e.final_response.text for e in run.events if e.HasField("final_response")]
    marks = MARK.findall(final[-1]) if final else []
    if marks and int(marks[-1][0]) == model.turns:
        recorded.setdefault(model.turns, set()).add(int(marks[-1][1]))
    for turn, requests in sorted(turns.attempts.items()):
        kept = recorded.get(turn, set())
        report.turns_requested_again += requests - 1
        if len(kept) > 1:
            report.violate("model_repeat", f"{run.seen.label}: turn {turn} forked, attempts {sorted(kept)} both kept")
        if kept and requests > max(kept):
            report.model_after_recorded += requests - max(kept)
            report.violate(
                "model_repeat",
                f"{run.seen.label} {run.seen.run_id}: turn {turn} requested {requests - max(kept)} more time(s) after "
                f"its recorded attempt {max(kept)}",
            )


def _check_resumption(run: RunLog, kills: list[float], report: Report) -> None:
    for event in run.events:
        if not event.HasField("run_recovered"):
            continue
        report.recovered += 1
        at = event.time.ToNanoseconds() / 1e9
        before = [k for k in kills if k <= at]
        if before:
            report.resume_s.append(at - before[-1])


def _check_effects(runs: list[RunLog], effects: Effects, report: Report, dead_letters: set[str] | None) -> None:
    results: dict[str, pb.ToolResult] = {}
    calls: dict[str, int] = {}  # key -> seq of its tool_call event
    recoveries: dict[str, int] = {}  # run id -> run_recovered events
    for run in runs:
        for event in run.events:
            if event.HasField("tool_result"):
                results[f"{event.run_id}:{event.tool_result.call_id}"] = event.tool_result
            elif event.HasField("tool_call"):
                calls[f"{event.run_id}:{event.tool_call.call_id}"] = event.seq
            elif event.HasField("run_recovered"):
                recoveries[event.run_id] = recoveries.get(event.run_id, 0) + 1
    if effects.without_key:
        report.violate("harness", f"{effects.without_key} tool request(s) carried no Idempotency-Key")
    for key, effect in sorted(effects.by_key.items()):
        result = results.get(key)
        if effect.kind == "safe":
            report.safe_calls += 1
            report.safe_repeats += effect.executions > 1
        else:
            report.unsafe_calls += 1
            report.unsafe_max_executions = max(report.unsafe_max_executions, effect.executions)
            report.unsafe_interrupted += effect.interrupted > 0
            if effect.executions > 1:
                report.violate("unsafe_repeat", f"unsafe call {key} executed {effect.executions} times")
            if effect.interrupted and result is not None and result.status != OUTCOME_UNKNOWN:
                status = pb.ToolStatus.Name(result.status)
                report.violate("unsafe_unreported", f"unsafe call {key} was cut off mid-flight but reported {status}")
        if result is None:
            logged = f"its tool_call is at seq {calls[key]}" if key in calls else "no tool_call either"
            report.violate(
                "unlogged_result",
                f"{effect.kind} call {key} ({', '.join(sorted(effect.paths))}) reached the upstream "
                f"{effect.executions} time(s) but its run's log has no tool_result for it ({logged}; the run was "
                f"recovered {recoveries.get(key.partition(':')[0], 0)} time(s))",
            )
    unknown = [key for key, r in results.items() if r.status == OUTCOME_UNKNOWN]
    report.outcome_unknown = len(unknown)
    report.unknown_not_sent = sum(key not in effects.by_key for key in unknown)
    if dead_letters is not None:
        report.unknown_dead_lettered = sum(key in dead_letters for key in unknown)
    for key in unknown if dead_letters is not None else ():
        if key not in dead_letters:
            report.violate("unknown_not_dead_lettered", f"call {key} ended OUTCOME_UNKNOWN but was not dead-lettered")


def canonical(events: list[pb.AgentEvent]) -> list[tuple[object, ...]]:
    """A log in a form two replicas must agree on: a replay may merge a stretch of text (or thinking) deltas into one
    event (`first_seq`..`seq`) or not, depending on how far behind the reader was, so such stretches are compared
    as their seqs and whole text; every other event as its bytes."""
    out: list[tuple[object, ...]] = []
    for e in events:
        kind = e.WhichOneof("event")
        if kind in ("text_delta", "thinking"):
            delta = getattr(e, kind)
            first = e.first_seq or e.seq
            if out and out[-1][:2] == (kind, delta.turn) and out[-1][3] == first - 1:
                out[-1] = (kind, delta.turn, out[-1][2], e.seq, out[-1][4] + delta.text)
                continue
            out.append((kind, delta.turn, first, e.seq, delta.text))
        else:
            # as JSON with sorted keys, not bytes: a Struct's map fields serialise in no fixed order
            out.append((e.seq, json.dumps(json_format.MessageToDict(e), sort_keys=True)))
    return out


def _starts(log: list[tuple[object, ...]], head: list[tuple[object, ...]]) -> bool:
    """Whether `head` is the start of `log`, its last item possibly the start of a stretch of deltas (a caller that
    stopped reading mid-turn)."""
    if not head or len(head) > len(log):
        return not head
    *whole, last = head
    if log[: len(whole)] != whole:
        return False
    full = log[len(whole)]
    if last == full:
        return True
    # a delta stretch (kind, turn, first, last seq, text) cut short
    return len(last) == 5 and last[:3] == full[:3] and str(full[4]).startswith(str(last[4]))


def _first_difference(bodies: dict[str, list[tuple[object, ...]]]) -> str:
    (a, left), (b, right) = list(bodies.items())[:2]
    for i, (x, y) in enumerate(zip(left, right, strict=False)):
        if x != y:
            return f"item {i}: {a} has {str(x)[:150]} where {b} has {str(y)[:150]}"
    return f"{a} has {len(left)} items, {b} {len(right)}"


def _gaps(seqs: list[int]) -> str:
    """A short account of how a seq list departs from 1..n: first few out-of-place seqs."""
    bad = [(i + 1, s) for i, s in enumerate(seqs) if s != i + 1][:3]
    return f"{len(seqs)} seqs, first misplaced (position, seq): {bad}" if bad else f"{len(seqs)} seqs, short"


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
