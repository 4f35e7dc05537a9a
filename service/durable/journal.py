"""One durable run's checkpoints, as the agent loop writes and replays them (decision 0001, consequences 4 and 5).

The loop records these steps (`service/durable/base.py`): a model turn once it has ended, a tool call once it has
its result, a call's approval request and its decision (`service/approvals.py`), and, before a call that is not
safe to repeat starts (after its approval), the intent to make it. A process that takes
over a run builds a `Journal` from the steps the run recorded, and the loop asks it on its way through again: the
`TurnEnd` of a recorded turn (the model is not asked again), the result of a recorded call (the call is not run
again, and none of its events is sent again), and whether a call with no result was intended (it may have happened).

A run without a journal pays for none of this: the loop tests for `None` at a turn's end and at a turn's tool calls.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import aclosing
from typing import Any

from tenacity import AsyncRetrying, retry_if_not_exception_type, stop_after_delay, stop_never
from tenacity import wait_exponential_jitter as backoff

from service import codec
from service.durable.base import CheckpointStore, DurableRun, Step, StepKind, TakenOver
from service.events import Event, RunRecovered, ToolResult
from service.interact import Decision
from service.models import base as m
from service.policy.call import ToolCallRequest

log = logging.getLogger(__name__)

FORMAT = 1
"""The layout of the step values written here; a reader meeting a newer one refuses it (rather than replay half)."""

CRASHED = "the process driving the run stopped before the run ended"
END_RETRY_S = 30.0
"""How long the end of a run is retried: the run has ended meanwhile; an end never recorded leaves the run to be
continued by a restart or a peer, which replays it to its (recorded) last turn and sends its closing event again."""


async def _written(write: Callable[[], Awaitable[None]], stop_after_s: float | None = None) -> None:
    """`write()`, and again with backoff while the store fails (the database away): the run waits for it, as a step
    must be recorded before the run goes on (the write is idempotent on its step number). Never a write that was
    refused (TakenOver). The run's deadline and cancellation bound the wait; `stop_after_s` too, when given."""
    try:
        await write()  # the usual case, without building a retrier per checkpoint
        return
    except TakenOver:
        raise
    except Exception as exc:
        log.warning("a checkpoint could not be written; retrying", extra={"error": str(exc) or type(exc).__name__})
    async for attempt in AsyncRetrying(
        retry=retry_if_not_exception_type(TakenOver),
        wait=backoff(multiplier=0.05, max=2.0, jitter=0.05),
        stop=stop_after_delay(stop_after_s) if stop_after_s is not None else stop_never,
        reraise=True,
    ):
        with attempt:
            await write()


def _no_seq() -> int:
    return 0


class Journal:
    """The checkpoints of one durable run: those recorded before (replayed), and the writing of new ones. Made by
    `start` for a new run, or by `resume` for a run another process (or this one before a restart) drove."""

    def __init__(
        self,
        store: CheckpointStore,
        run: DurableRun,
        *,
        fresh: bool,
        last_seq: Callable[[], int] = _no_seq,
        why: str = CRASHED,
        before_step: Callable[[], Awaitable[None]] | None = None,
        before_end: Callable[[], Awaitable[None]] | None = None,
        announce: bool = True,
    ) -> None:
        self.store = store
        self.announce = announce  # a resumed run's `open` says so (run_recovered); not a run claimed from the queue
        # awaited before each step and the end are written: the run's events up to then are kept (its log then
        # reaches every step's seq, and its closing event precedes its recorded end)
        self.before_step = before_step
        # awaited before the end is written: the run's closing events are in the store its callers read (on a fleet,
        # Redis; `before_step` does not wait for it, as a checkpoint ahead of the log is recovered). An outside
        # finding (chaos, kill -9): an end recorded first, then the process killed, left a run nobody continued
        # (its checkpoint said ended) and whose shared log never ended (its caller saw no end)
        self.before_end = before_end or before_step
        self.run = run
        self.run_id = run.run_id
        self.fresh = fresh
        self.recorded = not fresh  # whether the run is in the store (a new one: once `open` has recorded it)
        # the steps whose event the run's log holds, by key: "turn:N" (its `usage`), "call:ID" (its `tool_result`);
        # None: all recorded ones. A step recorded just before a crash may never have reached the log: its event is
        # then sent on the way through (`unlogged`)
        self.logged: set[str] | None = None
        # the log's last seq that belongs to a recorded step (`note_log`): a tool step is recorded before its
        # `tool_result` is logged, a turn before its `usage`, so the last checkpoint's seq may fall short of it
        self.kept_seq = 0
        self.last_seq = last_seq  # the run's last event seq, written with each step (recovery resumes after it)
        self.why = why
        self.step_no = 0
        self._turns: dict[int, m.TurnEnd] = {}
        self._steered: dict[int, list[str]] = {}  # turn → the steering texts its request read first
        self._results: dict[str, ToolResult] = {}
        self._intents: set[str] = set()
        self._asked: dict[str, float] = {}  # call id → the deadline of its approval request
        self._decided: dict[str, Decision] = {}
        self.calls_turn = 0  # the turn whose tool calls run now (`execute_durably`), for their intents
        self._last: Step | None = None
        for step in run.steps:
            self._replay(step)

    @classmethod
    def start(
        cls,
        store: CheckpointStore,
        *,
        run_id: str,
        caller: str,
        request: dict[str, Any],
        background: bool = False,
        last_seq: Callable[[], int] = _no_seq,
        before_step: Callable[[], Awaitable[None]] | None = None,
        before_end: Callable[[], Awaitable[None]] | None = None,
    ) -> Journal:
        """The journal of a new run; `open` records the run (`request`: its RunSpec as JSON) before it goes on."""
        run = DurableRun(
            run_id=run_id, caller=caller, owner=store.owner, state="running", request=request, background=background
        )
        return cls(store, run, fresh=True, last_seq=last_seq, before_step=before_step, before_end=before_end)

    @classmethod
    def resume(
        cls,
        store: CheckpointStore,
        run: DurableRun,
        *,
        last_seq: Callable[[], int] = _no_seq,
        why: str = CRASHED,
        before_step: Callable[[], Awaitable[None]] | None = None,
        before_end: Callable[[], Awaitable[None]] | None = None,
        announce: bool = True,
    ) -> Journal:
        """The journal of a run this process has claimed (`CheckpointStore.recover`), with its recorded steps; or,
        `announce` False, of a run claimed from the durable queue (recorded, never started: nothing to recover)."""
        return cls(
            store,
            run,
            fresh=False,
            last_seq=last_seq,
            why=why,
            before_step=before_step,
            before_end=before_end,
            announce=announce,
        )

    def _replay(self, step: Step) -> None:
        value = step.value
        if value.get("v", FORMAT) > FORMAT:
            raise ValueError(f"step {step.step_no} of run {step.run_id} has format {value['v']}; this reads {FORMAT}")
        self.step_no = max(self.step_no, step.step_no)
        self._last = step if self._last is None or step.step_no > self._last.step_no else self._last
        if step.kind == "turn":
            self._turns[int(value["turn"])] = m.TurnEnd(
                stop_reason=value["stop_reason"],
                content=value["content"],
                input_tokens=value["input_tokens"],
                output_tokens=value["output_tokens"],
                bad_inputs=value.get("bad_inputs", {}),
            )
            self._steered[int(value["turn"])] = value.get("steered", [])
        elif step.kind == "tool":
            result = codec.from_dict(value["result"])
            if not isinstance(result, ToolResult):
                raise ValueError(f"step {step.step_no} of run {step.run_id}: a tool step holds a {result.kind}")
            self._results[result.call_id] = result
        elif step.kind == "intent":
            self._intents.add(value["call_id"])
        elif step.kind == "asked":
            self._asked[value["call_id"]] = float(value["deadline"])
        elif step.kind == "decided":
            self._decided[value["call_id"]] = Decision(
                approved=value["approved"], by=value["by"], reason=value["reason"], edited_input=value["edited_input"]
            )
        else:
            raise ValueError(f"step {step.step_no} of run {step.run_id} is of an unknown kind {step.kind!r}")

    # What the loop asks on its way through a recovered run.

    def turn(self, turn: int) -> m.TurnEnd | None:
        """The recorded end of model turn `turn`, or None when it must be requested (again)."""
        return self._turns.get(turn)

    def steered(self, turn: int) -> list[str]:
        """The steering texts the request of recorded turn `turn` read (added to the history before it)."""
        return self._steered.get(turn, [])

    def result(self, call_id: str) -> ToolResult | None:
        """The recorded result of a call: it is not run again, and nothing of it is sent again."""
        return self._results.get(call_id)

    def note_log(self, keys: Sequence[tuple[str, int]]) -> None:
        """What the rebuilt log of a resumed run holds of its steps: (key, seq) of each step's event ("turn:N",
        "call:ID", "decided:ID"). Those of recorded steps are not sent again, so `run_recovered` names the last of
        them, not only the checkpoint's seq: a caller drops what it holds after that seq and loses none of them."""
        self.logged = {key for key, _ in keys}
        self.kept_seq = max((seq for key, seq in keys if self._holds(key)), default=0)

    def _holds(self, key: str) -> bool:
        kind, _, name = key.partition(":")
        if kind == "turn":
            return name.isdigit() and int(name) in self._turns
        if kind == "call":
            return name in self._results
        return kind == "decided" and name in self._decided

    def unlogged(self, key: str) -> bool:
        """Whether a recorded step's event is missing from the run's log ("turn:N", "call:ID"): its process died
        between recording it and logging the event. It is sent then (the step is not done again), so that the
        caller's record of tokens and side effects is whole."""
        return self.logged is not None and key not in self.logged

    def intended(self, call_id: str) -> bool:
        """Whether an unsafe call's intent was recorded: with no result, it may have happened."""
        return call_id in self._intents

    def asked(self, call_id: str) -> float | None:
        """The deadline of a call's recorded approval request (a wait resumed keeps it), or None."""
        return self._asked.get(call_id)

    def decided(self, call_id: str) -> Decision | None:
        """A call's recorded approval decision: applied again on the way through, nobody is asked again."""
        return self._decided.get(call_id)

    async def open(self) -> RunRecovered | None:
        """A new run: recorded as this process's, before its first model turn. A resumed one: the `RunRecovered`
        event the loop sends before anything else, saying from which checkpoint it goes on and why."""
        if self.fresh:
            await self.record()
            return None
        if not self.announce:
            return None
        last = self._last
        return RunRecovered(
            step_no=0 if last is None else last.step_no,
            turn=max(self._turns, default=0),
            seq=max(0 if last is None else last.seq, self.kept_seq),
            reason=self.why,
        )

    # What the loop records.

    async def record(self) -> None:
        """Record a new run as this process's (once; `open` does it unless done before)."""
        if not self.recorded:
            await _written(functools.partial(self.store.begin, self.run))
            self.recorded = True

    async def turn_ended(self, turn: int, end: m.TurnEnd, steered: Sequence[str] = ()) -> None:
        """Record model turn `turn`, with the steering texts its request read first (`steered`)."""
        value = {
            "v": FORMAT,
            "turn": turn,
            "stop_reason": end.stop_reason,
            "content": end.content,
            "input_tokens": end.input_tokens,
            "output_tokens": end.output_tokens,
            "bad_inputs": end.bad_inputs,
            "steered": list(steered),
        }
        await self._put("turn", f"turn:{turn}", value)
        self._turns[turn] = end
        self._steered[turn] = list(steered)

    async def intend(self, call: ToolCallRequest) -> None:
        """Record the intent of `call`, an unsafe call about to start (after its approval, if it needed one);
        returns once committed."""
        value = {"v": FORMAT, "turn": self.calls_turn, "call_id": call.call_id, "name": call.name, "input": call.input}
        await self._put("intent", f"call:{call.call_id}", value)
        self._intents.add(call.call_id)

    async def ask(self, call_id: str, deadline: float) -> None:
        """Record that `call_id` waits for approval until `deadline` (wall clock), before the wait starts."""
        await self._put("asked", f"asked:{call_id}", {"v": FORMAT, "call_id": call_id, "deadline": deadline})
        self._asked[call_id] = deadline

    async def decide(self, call_id: str, decision: Decision) -> None:
        """Record the decision on `call_id` (a timeout's too), before the call goes on or is denied."""
        value = {
            "v": FORMAT,
            "call_id": call_id,
            "approved": decision.approved,
            "by": decision.by,
            "reason": decision.reason,
            "edited_input": decision.edited_input,
        }
        await self._put("decided", f"decided:{call_id}", value)
        self._decided[call_id] = decision

    async def recording(self, turn: int, events: AsyncIterator[Event]) -> AsyncIterator[Event]:
        """A call's events, its result recorded (committed) before it is passed on: a result the caller has seen is
        never replaced by another after a crash."""
        async with aclosing(events):  # type: ignore[type-var]
            async for event in events:
                if type(event) is ToolResult:
                    value = {"v": FORMAT, "turn": turn, "result": codec.to_dict(event)}
                    await self._put("tool", f"call:{event.call_id}", value)
                    self._results[event.call_id] = event
                yield event

    async def end(self, state: str) -> None:
        """The run has ended (its closing event already passed on) in `state`, its RunState's value: "succeeded",
        "failed" or "cancelled". It is not to be recovered any more (unless the store stays away: see END_RETRY_S)."""
        try:
            if self.before_end is not None:
                # bounded: a store away for longer leaves the end unrecorded, for a restart or a peer to find the run
                # ended in it, or to replay it to its recorded last turn and send its closing event again
                async with asyncio.timeout(END_RETRY_S):
                    await self.before_end()
            await _written(functools.partial(self.store.end, self.run_id, state), END_RETRY_S)
        except TakenOver:
            raise
        except Exception:
            log.exception("the end of a durable run could not be recorded", extra={"run_id": self.run_id})

    async def _put(self, kind: StepKind, key: str, value: dict[str, Any]) -> None:
        # numbered before the await: the steps of concurrent calls get distinct numbers in the order they ended
        self.step_no += 1
        step = Step(run_id=self.run_id, step_no=self.step_no, kind=kind, key=key, value=value, seq=self.last_seq())
        if self.before_step is not None:
            await self.before_step()
        await _written(functools.partial(self.store.put, step))


def recorded_results(journal: Journal, calls: Iterable[ToolCallRequest]) -> dict[str, ToolResult]:
    """The recorded results among `calls`, by call id."""
    found = {}
    for call in calls:
        result = journal.result(call.call_id)
        if result is not None:
            found[call.call_id] = result
    return found
