"""Durable runs in the agent loop: checkpoints at each finished model turn and tool call and before each unsafe call,
and a run replayed from its steps after its process died at any point (issue 18). Scripted model, counted requests,
counted tool executions, an in-memory checkpoint store; the dead letters go to the real SQLite store."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from durable_memory import Ledger, MemoryCheckpoints
from pydantic import BaseModel

from service import events as ev
from service.config import Pacing
from service.control import RunControl
from service.durable.base import DurableRun, Step, TakenOver
from service.durable.journal import FORMAT, Journal
from service.durable_runs import _step_key
from service.errors import RunCancelled
from service.executor import Executor
from service.interact import Steer
from service.loop import AgentLoop, RunSpec
from service.models.scripted import Scenario, ScriptedModel
from service.records.deadletter import DeadLetterStore
from service.spec import SPEC_FORMAT
from tools.base import JSON, Tool, current_call
from tools.policy import ToolPolicy

S = ev.ToolStatus
RUN = "run_d"


class TextInput(BaseModel):
    text: str


class Pay(Tool[TextInput]):
    """Not safe to repeat (the default policy). Counts its executions per input, and checks that its intent was
    committed before it started."""

    name = "pay"
    description = "Pays."
    Input = TextInput

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.runs: Counter[str] = Counter()
        self.without_intent = 0

    async def run(self, args: TextInput) -> JSON:
        call = current_call()
        assert call is not None
        steps = self.ledger.steps.get(call.run_id, {}).values()
        if not any(s.kind == "intent" and s.key == f"call:{call.call_id}" for s in steps):
            self.without_intent += 1
        self.runs[args.text] += 1
        await asyncio.sleep(0)
        return {"paid": args.text}


class Look(Tool[TextInput]):
    """Safe to repeat: records the idempotency key of each execution."""

    name = "look"
    description = "Looks."
    Input = TextInput
    policy = ToolPolicy(side_effects="idempotent")

    def __init__(self) -> None:
        self.keys: list[str] = []
        self.runs: Counter[str] = Counter()

    async def run(self, args: TextInput) -> JSON:
        call = current_call()
        assert call is not None
        self.keys.append(call.idempotency_key)
        self.runs[args.text] += 1
        return {"saw": args.text}


SCENARIO = [
    {
        "text": "Paying and looking.",
        "tool_calls": [{"name": "pay", "input": {"text": "a"}}, {"name": "look", "input": {"text": "b"}}],
    },
    {"text": "One more.", "tool_calls": [{"name": "pay", "input": {"text": "c"}}]},
    {"text": "Done: {results}"},
]


class Process:
    """One server process: its model, tools and checkpoint store, on a ledger shared with the others."""

    def __init__(self, ledger: Ledger, owner: str, tmp_path: Path) -> None:
        scenario = Scenario.model_validate({"name": "durable", "turns": SCENARIO})
        self.model = ScriptedModel(scenario, pacing=Pacing(first_token_ms=0, token_interval_ms=0))
        self.pay, self.look = Pay(ledger), Look()
        self.dead = DeadLetterStore(tmp_path / f"dl-{owner}.db")
        tools: dict[str, Tool[Any]] = {"pay": self.pay, "look": self.look}
        self.loop = AgentLoop(self.model, Executor(tools, dead_letter=self.dead))
        self.store = MemoryCheckpoints(ledger, owner)

    def journal(self, spec: RunSpec) -> Journal:
        return Journal.start(self.store, run_id=spec.run_id, caller="alice", request=spec.to_json())

    async def collect(self, spec: RunSpec, journal: Journal | None, *, announce: bool = True) -> list[ev.Event]:
        return [e async for e in self.loop.run(spec, announce=announce, journal=journal)]

    async def aclose(self) -> None:
        await self.loop.executor.aclose()


def make_spec(**overrides: Any) -> RunSpec:
    values: dict[str, Any] = dict(
        run_id=RUN,
        message="pay a and c, look at b",
        model="m",
        system=None,
        max_turns=5,
        max_tokens=100,
        tools=("pay", "look"),
        metadata={"caller": "alice"},
        durable=True,
    )
    values.update(overrides)
    return RunSpec(**values)


def final(events: list[ev.Event]) -> ev.FinalResponse:
    last = events[-1]
    assert isinstance(last, ev.FinalResponse), last
    return last


def results(events: list[ev.Event]) -> list[ev.ToolResult]:
    return [e for e in events if isinstance(e, ev.ToolResult)]


async def test_a_durable_run_checkpoints_turns_results_and_intents_and_streams_as_before(tmp_path: Path) -> None:
    ledger = Ledger()
    durable, plain = Process(ledger, "p1", tmp_path), Process(Ledger(), "p0", tmp_path)
    spec = make_spec()
    events = await durable.collect(spec, durable.journal(spec))
    baseline = await plain.collect(make_spec(durable=False), None)

    # the caller sees the same run: same events, same answer (call ids are the model's, new each time)
    assert [type(e).__name__ for e in events] == [type(e).__name__ for e in baseline]
    assert final(events).text == final(baseline).text and final(events).turns == 3
    run = ledger.load(RUN)
    assert run is not None and run.state == "succeeded" and run.owner == "p1" and run.caller == "alice"
    assert RunSpec.from_json(run.request) == spec
    kinds = [s.kind for s in run.steps]
    assert [s.step_no for s in run.steps] == list(range(1, 9))
    # turn 1, pay a's intent (look is safe: none), both results, turn 2, pay c's intent and result, turn 3
    assert kinds[:2] == ["turn", "intent"] and sorted(kinds[2:4]) == ["tool", "tool"]
    assert kinds[4:] == ["turn", "intent", "tool", "turn"]
    assert durable.pay.without_intent == 0  # each intent was committed before its call started
    assert all(s.value["v"] == FORMAT for s in run.steps)
    # each step knows how far the log had got (the loop's own count here: no registry numbers the events)
    assert [s.key for s in run.steps if s.kind == "turn"] == ["turn:1", "turn:2", "turn:3"]
    recorded = {s.value["result"]["call_id"]: s.value["result"] for s in run.steps if s.kind == "tool"}
    assert {r.call_id: r.data for r in results(events)} == {k: v["data"] for k, v in recorded.items()}
    await durable.aclose()
    await plain.aclose()


async def full_run(tmp_path: Path) -> tuple[Ledger, list[ev.Event], Process]:
    ledger = Ledger()
    first = Process(ledger, "p1", tmp_path)
    spec = make_spec()
    events = await first.collect(spec, first.journal(spec))
    return ledger, events, first


@pytest.mark.parametrize("recorded", range(9))
async def test_a_run_replayed_after_a_crash_repeats_nothing_recorded(tmp_path: Path, recorded: int) -> None:
    """The process died right after committing `recorded` of the run's 8 steps; another continues it."""
    ledger, original, first = await full_run(tmp_path)
    run = ledger.load(RUN)
    assert run is not None and len(run.steps) == 8
    ledger.runs[RUN] = replace(ledger.runs[RUN], state="running")  # it had not ended when its process died
    second = Process(ledger, "p2", tmp_path)
    claimed = second.store.claim(RUN, first=recorded)
    steps = claimed.steps
    journal = Journal.resume(second.store, claimed, why="p1 stopped")
    spec = RunSpec.from_json(claimed.request)
    events = await second.collect(spec, journal, announce=False)

    # run_recovered, once and first, says from where
    recovered = [e for e in events if isinstance(e, ev.RunRecovered)]
    assert len(recovered) == 1 and events[0] is recovered[0]
    turns = [s for s in steps if s.kind == "turn"]
    assert recovered[0] == ev.RunRecovered(
        step_no=recorded, turn=len(turns), seq=steps[-1].seq if steps else 0, reason="p1 stopped"
    )
    # a recorded turn is not requested again
    assert len(second.model.requests) == 3 - len(turns)
    # a recorded call is not run again, and nothing of it is sent again
    done = {s.value["result"]["call_id"] for s in steps if s.kind == "tool"}
    intended = {s.value["call_id"] for s in steps if s.kind == "intent"} - done
    names = {
        b["id"]: (b["name"], b["input"]["text"]) for t in turns for b in t.value["content"] if b["type"] == "tool_use"
    }
    assert not [e for e in events if getattr(e, "call_id", None) in done]
    for text in ("a", "b", "c"):
        call_ids = [c for c, (_, t) in names.items() if t == text]
        tool = second.look if text == "b" else second.pay
        if call_ids and call_ids[0] in done:
            assert tool.runs[text] == 0, text
        elif call_ids and call_ids[0] in intended:
            # an unsafe call cut off after its intent: not sent again, reported unknown, dead-lettered
            assert tool.runs[text] == 0, text
            (result,) = [r for r in results(events) if r.call_id == call_ids[0]]
            assert result.status is S.OUTCOME_UNKNOWN
            letters = second.dead.recent()
            assert [(d.run_id, d.call_id, d.status) for d in letters] == [(RUN, call_ids[0], "outcome_unknown")]
        else:
            assert tool.runs[text] == 1, text  # never started (no intent), or safe to repeat: run once
    # a safe call cut off runs again under the same idempotency key as before
    look_ids = [c for c, (name, _) in names.items() if name == "look"]
    if look_ids and look_ids[0] not in done:
        assert second.look.keys == first.look.keys == [f"{RUN}:{look_ids[0]}"]
    assert second.pay.without_intent == 0
    # the same answer as the uninterrupted run, unless the call it reports on was cut off
    if not any(r.status is S.OUTCOME_UNKNOWN and r.name == "pay" for r in results(events)[-1:]):
        assert final(events).text == final(original).text
    assert final(events).turns == 3 and final(events).tool_calls == 3
    assert ledger.runs[RUN].state == "succeeded"
    await first.aclose()
    await second.aclose()


async def test_parallel_unsafe_calls_are_each_intended_before_it_starts(tmp_path: Path) -> None:
    ledger = Ledger()
    proc = Process(ledger, "p1", tmp_path)
    proc.model.scenario = Scenario.model_validate(
        {
            "turns": [
                {"tool_calls": [{"name": "pay", "input": {"text": t}} for t in "xyz"]},
                {"text": "paid"},
            ]
        }
    )
    spec = make_spec()
    events = await proc.collect(spec, proc.journal(spec))
    assert final(events).text == "paid" and proc.pay.runs == Counter("xyz")
    assert proc.pay.without_intent == 0
    run = ledger.load(RUN)
    assert run is not None
    assert [s.kind for s in run.steps][:4] == ["turn", "intent", "intent", "intent"]
    await proc.aclose()


async def test_a_run_taken_over_stops_at_once_and_says_nothing_more(tmp_path: Path) -> None:
    ledger = Ledger()
    proc = Process(ledger, "p1", tmp_path)
    thief = MemoryCheckpoints(ledger, "p2")
    run_pay = proc.pay.run

    async def pay_then_lose_the_run(args: TextInput) -> JSON:
        thief.claim(RUN)  # another process found this one dead (it was only slow) and took the run over
        return await run_pay(args)

    proc.pay.run = pay_then_lose_the_run  # type: ignore[method-assign]
    spec = make_spec()
    seen: list[ev.Event] = []
    with pytest.raises(TakenOver):
        async for event in proc.loop.run(spec, journal=proc.journal(spec)):
            seen.append(event)
    # `look` (safe, no intent to wait for) may have ended before the takeover; nothing of `pay` or the run after it
    assert not any(isinstance(e, ev.FinalResponse | ev.RunFailed) for e in seen)
    assert not any(isinstance(e, ev.ToolResult) and e.name == "pay" for e in seen)
    assert len(proc.model.requests) == 1
    run = ledger.load(RUN)
    assert run is not None and run.owner == "p2" and run.state == "running"
    assert [s.kind for s in run.steps][:2] == ["turn", "intent"]
    paid = run.steps[1].key
    assert [s.kind for s in run.steps if s.key == paid] == ["intent"]  # nothing of p1's after the claim
    await proc.aclose()


async def test_a_non_durable_run_writes_no_checkpoint(tmp_path: Path) -> None:
    ledger = Ledger()
    proc = Process(ledger, "p1", tmp_path)
    events = await proc.collect(make_spec(durable=False), None)
    assert final(events).turns == 3 and not ledger.runs and proc.store.puts == 0
    await proc.aclose()


def test_run_spec_round_trips_through_json() -> None:
    spec = make_spec(system="be brief", max_tool_calls=4, max_output_tokens=900, trace_context=object())
    data = spec.to_json()
    assert data["v"] == SPEC_FORMAT and "trace_context" not in data
    again = RunSpec.from_json(data)
    assert again == make_spec(system="be brief", max_tool_calls=4, max_output_tokens=900)
    assert isinstance(again.tools, tuple)
    with pytest.raises(ValueError, match="format"):
        RunSpec.from_json({**data, "v": SPEC_FORMAT + 1})
    with pytest.raises(ValueError, match="bad run spec"):
        RunSpec.from_json({**data, "priority": 3})


async def test_a_step_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    ledger, _, first = await full_run(tmp_path)
    run = ledger.load(RUN)
    assert run is not None
    newer = replace(run.steps[0], value={**run.steps[0].value, "v": FORMAT + 1})
    with pytest.raises(ValueError, match="format"):
        Journal.resume(first.store, replace(run, steps=[newer]))
    await first.aclose()


async def test_a_durable_run_that_fails_or_is_stopped_is_left_ended(tmp_path: Path) -> None:
    ledger = Ledger()
    proc = Process(ledger, "p1", tmp_path)
    spec = make_spec(max_turns=2)  # the scenario needs 3
    events = await proc.collect(spec, proc.journal(spec))
    assert isinstance(events[-1], ev.RunFailed) and events[-1].code == "RESOURCE_EXHAUSTED"
    assert ledger.runs[RUN].state == "failed"

    control = RunControl()
    control.stop_now(RunCancelled("cancelled by CancelRun"))
    stopped = make_spec(run_id="run_s")
    events = [e async for e in proc.loop.run(stopped, control, journal=proc.journal(stopped))]
    assert isinstance(events[-1], ev.RunFailed) and events[-1].code == "CANCELLED"
    assert ledger.runs["run_s"].state == "cancelled"
    await proc.aclose()


class Flaky(MemoryCheckpoints):
    """A store whose database is away for its first `failures` writes of each kind (a PostgreSQL restart)."""

    def __init__(self, ledger: Ledger, owner: str, failures: int) -> None:
        super().__init__(ledger, owner)
        self.failures = {"begin": failures, "put": failures, "end": failures}

    def _away(self, kind: str) -> None:
        if self.failures[kind] > 0:
            self.failures[kind] -= 1
            raise ConnectionError("the records database does not answer")

    async def begin(self, run: DurableRun) -> None:
        self._away("begin")
        await super().begin(run)

    async def put(self, step: Step) -> None:
        self._away("put")
        await super().put(step)

    async def end(self, run_id: str, state: str) -> None:
        self._away("end")
        await super().end(run_id, state)


async def test_a_checkpoint_the_database_failed_is_written_again_before_the_run_goes_on(tmp_path: Path) -> None:
    """Not a crash of the run: it waits for the database (with backoff) and records each step once, in order."""
    ledger = Ledger()
    process = Process(ledger, "p1", tmp_path)
    process.store = Flaky(ledger, "p1", failures=2)
    spec = make_spec()
    events = await process.collect(spec, process.journal(spec))
    assert final(events).turns == 3
    run = ledger.load(RUN)
    assert run is not None and run.state == "succeeded"
    assert [s.step_no for s in run.steps] == list(range(1, 9))
    assert process.pay.without_intent == 0 and sum(process.pay.runs.values()) == 2
    await process.aclose()


async def crashed_after(tmp_path: Path, recorded: int) -> tuple[list[ev.Event], Process, Process, DurableRun, Journal]:
    """A full run whose process is taken to have died after committing `recorded` steps, claimed by another: the
    original run's events, both processes, the claimed run and its resumed journal."""
    ledger, original, first = await full_run(tmp_path)
    ledger.runs[RUN] = replace(ledger.runs[RUN], state="running")  # it had not ended when its process died
    second = Process(ledger, "p2", tmp_path)
    claimed = second.store.claim(RUN, first=recorded)
    return original, first, second, claimed, Journal.resume(second.store, claimed)


@pytest.mark.parametrize("recorded", range(1, 9))
async def test_run_recovered_names_the_last_logged_event_of_a_recorded_step(tmp_path: Path, recorded: int) -> None:
    """A tool step is recorded just before its `tool_result` is logged, a turn before its `usage`: the process died
    after logging that event, and the log the run goes on from ends with it. `run_recovered.seq` names it, not the
    checkpoint's seq before it, since a caller drops what it holds after that seq and the event is not sent again (an
    outside finding: a kept `tool_result` fell in the dropped stretch)."""
    original, first, second, claimed, journal = await crashed_after(tmp_path, recorded)
    recorded_keys = {s.key for s in claimed.steps if s.kind != "intent"}
    # the live run's seqs: `original` from run_started (seq 1) on; the log ends with the last recorded step's event
    keyed = [(key, seq) for seq, event in enumerate(original, start=1) if (key := _step_key(event))]
    ends = [seq for key, seq in keyed if key in recorded_keys]
    log_end = max(ends, default=1)
    journal.note_log([(key, seq) for key, seq in keyed if seq <= log_end])
    events = await second.collect(RunSpec.from_json(claimed.request), journal, announce=False)

    (recovered,) = [e for e in events if isinstance(e, ev.RunRecovered)]
    assert recovered.seq == max(ends, default=0)  # the checkpoints' own seqs are 0 in this harness
    # nothing at or before that seq is sent again: each recorded step's event is the caller's to keep
    keys_sent = {key for e in events if (key := _step_key(e))}
    assert not keys_sent & recorded_keys
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("recorded", [3, 4, 5, 7])
async def test_recorded_steps_whose_events_never_reached_the_log_are_sent_not_done_again(
    tmp_path: Path, recorded: int
) -> None:
    """The process died between recording a step and logging its event (a chaos finding): the log the run goes
    on from lacks that `tool_result` (or `usage`). The continuation sends those events (each once, the recorded
    value), runs nothing again and requests no recorded turn again; the events the log has are not sent again."""
    original, first, second, claimed, journal = await crashed_after(tmp_path, recorded)
    recorded_keys = {s.key for s in claimed.steps if s.kind != "intent"}
    lost = sorted(recorded_keys)[-1]  # one step's event missing from the log; the others' there
    journal.logged = recorded_keys - {lost}
    events = await second.collect(RunSpec.from_json(claimed.request), journal, announce=False)

    resent = [e for e in events if isinstance(e, ev.Usage | ev.ToolResult)]
    kind, _, name = lost.partition(":")
    if kind == "turn":
        sent_again: list[Any] = [e for e in resent if isinstance(e, ev.Usage) and e.turn == int(name)]
    else:
        sent_again = [e for e in resent if isinstance(e, ev.ToolResult) and e.call_id == name]
    assert len(sent_again) == 1, (lost, resent)
    if kind == "call":
        (before,) = [r for r in results(original) if r.call_id == name]
        assert sent_again[0] == before  # the recorded result, as the model got it
    others = recorded_keys - {lost}
    assert not [e for e in resent if f"call:{getattr(e, 'call_id', '')}" in others]
    turns = {s.key for s in claimed.steps if s.kind == "turn"}
    assert len(second.model.requests) == 3 - len(turns)  # no recorded turn requested again
    blocks = [b for s in claimed.steps if s.kind == "turn" for b in s.value["content"] if b["type"] == "tool_use"]
    texts = {b["id"]: b["input"]["text"] for b in blocks}
    done = {texts[key.partition(":")[2]] for key in recorded_keys if key.startswith("call:")}
    assert not done & set(second.pay.runs + second.look.runs)  # no recorded call run again
    assert final(events).turns == 3
    await first.aclose()
    await second.aclose()


@pytest.mark.parametrize("recorded", [1, 5])
async def test_steering_read_before_a_crash_is_in_the_resumed_runs_history(tmp_path: Path, recorded: int) -> None:
    """A text sent before turn 1 is recorded with that turn: the process that continues the run after turn 1 (or
    turn 2) asks the model with the very history the first one would have (the text in it, once)."""
    ledger = Ledger()
    first = Process(ledger, "p1", tmp_path)
    spec = make_spec()
    control = RunControl()
    control.inbox.emit = lambda event: None  # no registry logs its input_received here
    control.inbox.send(Steer(text="only pay in euros", when="ASAP", by="alice"))
    events = [e async for e in first.loop.run(spec, control, journal=first.journal(spec))]
    assert final(events).turns == 3
    ledger.runs[RUN] = replace(ledger.runs[RUN], state="running")
    second = Process(ledger, "p2", tmp_path)
    claimed = second.store.claim(RUN, first=recorded)
    assert claimed.steps[-1].kind == "turn" and claimed.steps[0].value["steered"] == ["only pay in euros"]
    await second.collect(spec, Journal.resume(second.store, claimed), announce=False)
    asked = len(first.model.requests) - len(second.model.requests)
    # its first request (later ones hold tool_use ids the second model made up anew)
    assert second.model.requests[0].messages == first.model.requests[asked].messages
    said = [b["text"] for msg in second.model.requests[0].messages for b in msg["content"] if b["type"] == "text"]
    assert said.count("only pay in euros") == 1
    await first.aclose()
    await second.aclose()
