"""One model turn as the loop's events: the model's stream mapped to domain events and ended by its `TurnEnd`, retried
with backoff on retryable failures only while nothing of the turn has reached the caller."""

from __future__ import annotations

import logging
from collections.abc import Callable
from types import TracebackType
from typing import Any

from tenacity.wait import wait_base

from service import events as ev
from service import telemetry
from service.config import ModelRetry
from service.control import RunControl
from service.errors import ModelError, ModelUnavailable, model_failure
from service.events import Event, TextDelta, Thinking, ToolCall, ToolCallDelta
from service.models import base as m
from service.policy.retry import wait_after

log = logging.getLogger(__name__)

# The longest wait a model's retry-after may ask of a run; beyond it the run ends at once, retryable, for the caller
# to try again later rather than hold a stream open that long.
MAX_RETRY_AFTER_S = 60.0


class ModelTurn:
    """One model turn's bookkeeping around the model's stream: its duration (`agent_model_turn_duration_seconds`) and
    span, what went out of it, and whether a failure is retried. The agent loop iterates the model's stream itself
    with it (`AgentLoop.run`): a generator layer of its own would cost every run a generator and every event a hop
    through it (about 10,000 instructions per short run, 1,800 per event).

    As a context manager it spans the turn, retries and waits included; `failed` says what a failure of the stream
    leads to: raised, or the `ModelRetry` event to send before `delay` s and the next attempt."""

    __slots__ = (
        "turn",
        "retry",
        "backoff",
        "clock",
        "control",
        "opened",
        "attempt",
        "emitted",
        "delay",
        "started",
        "span",
    )

    def __init__(
        self,
        turn: int,
        retry: ModelRetry,
        backoff: wait_base,
        clock: Callable[[], float],
        trace_context: Any = None,
        control: RunControl | None = None,
        opened: dict[str, str] | None = None,
    ) -> None:
        self.turn, self.retry, self.backoff, self.clock = turn, retry, backoff, clock
        self.control, self.opened = control, opened
        self.attempt = 1
        self.emitted = False  # once anything of the turn is out, a retry would show the caller a different answer
        self.delay = 0.0
        self.started = clock()
        # without tracing, no span at all: the no-op one still costs every turn its creation and ending
        self.span = (
            telemetry.tracer().start_span("model_turn", context=trace_context, attributes={"model.turn": turn})
            if telemetry.tracing_enabled()
            else None
        )

    def __enter__(self) -> ModelTurn:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        telemetry.MODEL_TURN.observe(self.clock() - self.started)
        if self.span is not None:
            telemetry.end_span(self.span, exc)

    def mapped(self, event: m.ModelEvent) -> Event:
        """A model event other than its `TurnEnd` as the loop's; a call begun is noted in `opened` before its
        `ToolCall` goes out: from then on, it gets a result whatever happens."""
        self.emitted = True
        if type(event) is m.TextDelta:  # most of a turn's events
            return TextDelta(turn=self.turn, text=event.text)
        mapped = _map_model_event(self.turn, event)
        if self.opened is not None and type(mapped) is ToolCall:
            self.opened[mapped.call_id] = mapped.name
        return mapped  # type: ignore[return-value]

    def failed(self, exc: BaseException) -> ev.ModelRetry:
        """The `ModelRetry` event to send before the next attempt (after `delay` s), or the run's error raised:
        retryable failures are retried with backoff only while nothing of the turn has reached the caller. `exc`
        raised again when it is not the model's failure (a `ModelError` or `TimeoutError`): a cancel, a bug."""
        if not isinstance(exc, ModelError | TimeoutError):
            try:
                raise exc
            finally:
                del exc  # else this frame, in its traceback, holds it: a cycle left for the collector
        if isinstance(exc, TimeoutError):
            timed_out = _timed_out(exc)
            timed_out.__cause__ = exc  # as `raise … from`
            exc = timed_out
        turn, attempt, attempts = self.turn, self.attempt, self.retry.attempts
        if not exc.retryable:
            raise model_failure(turn, exc) from exc
        if self.emitted:
            raise ModelUnavailable(f"model turn {turn} failed after part of it was streamed: {exc.message}") from exc
        if attempt == attempts:
            raise ModelUnavailable(f"model turn {turn} failed after {attempt} attempt(s): {exc.message}") from exc
        # The model's own word on when to come back beats our guess.
        delay = exc.retry_after_s or wait_after(self.backoff, attempt)
        left = self.control.remaining() if self.control is not None else None
        too_long = bool(exc.retry_after_s) and delay > MAX_RETRY_AFTER_S
        if too_long or (left is not None and delay >= left):
            # a wait past the run's deadline would end it DEADLINE_EXCEEDED, as if the caller had asked too little:
            # end it now, retryable, with the model's reason
            asked = "the model asks to retry" if exc.retry_after_s else "the next try would come"
            why = "" if too_long or left is None else f", after the run's deadline ({max(left, 0):.1f} s left)"
            raise ModelUnavailable(
                f"model turn {turn} failed and {asked} after {delay:.0f} s{why}: {exc.message}"
            ) from exc
        telemetry.MODEL_RETRIES.inc()
        log.warning(
            "model turn failed, retrying",
            extra={"turn": turn, "attempt": attempt, "wait_s": round(delay, 3), "error": exc.message},
        )
        self.attempt, self.delay = attempt + 1, delay
        # the caller would otherwise see nothing for as long as the wait and the next try take
        return ev.ModelRetry(turn=turn, attempt=attempt, max_attempts=attempts, wait_s=delay, error=exc.message)


def _map_model_event(turn: int, event: m.ModelEvent) -> Event | m.TurnEnd:
    if type(event) is m.TextDelta:  # most of a turn's events: skip the pattern matching
        return TextDelta(turn=turn, text=event.text)
    match event:
        case m.TextDelta(text=text):
            return TextDelta(turn=turn, text=text)
        case m.ThinkingDelta(text=text):
            return Thinking(turn=turn, text=text)
        case m.ToolUseStart(call_id=call_id, name=name):
            return ToolCall(turn=turn, call_id=call_id, name=name)
        case m.ToolUseDelta(call_id=call_id, partial_json=piece):
            return ToolCallDelta(call_id=call_id, partial_json=piece)
        case m.TurnEnd():
            return event
    raise TypeError(f"unknown model event {event!r}")


def _timed_out(err: TimeoutError) -> ModelError:
    """A TimeoutError from the model's stream (an SDK, socket or `asyncio.timeout` in an adapter that did not map
    it): a model failure worth another try, as the adapters' own timeouts are. Left alone, it would reach the run's
    scope and be taken for the run's deadline."""
    return ModelError(f"the model timed out: {err or 'no detail'}", retryable=True)
