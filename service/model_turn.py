"""One model turn as the loop's events: the model's stream mapped to domain events and ended by its `TurnEnd`, retried
with backoff on retryable failures only while nothing of the turn has reached the caller."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
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


async def stream_turn(
    model: m.Model,
    turn: int,
    request: m.TurnRequest,
    *,
    retry: ModelRetry,
    backoff: wait_base,
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    trace_context: Any = None,
    control: RunControl | None = None,
    opened: dict[str, str] | None = None,
) -> AsyncIterator[Event | m.TurnEnd]:
    """Stream one model turn, retrying retryable failures with backoff only while nothing of the turn has
    reached the caller: once a delta is out, a retry would show the caller a different answer. Each call the turn
    begins is noted in `opened` (call id → name) before its `ToolCall` goes out: from then on, it gets a result
    whatever happens."""
    emitted = False
    started = clock()
    # without tracing, no span at all: the no-op one still costs every turn its creation and ending
    span = (
        telemetry.tracer().start_span("model_turn", context=trace_context, attributes={"model.turn": turn})
        if telemetry.tracing_enabled()
        else None
    )
    failure: BaseException | None = None
    try:
        for attempt in range(1, retry.attempts + 1):
            try:
                try:
                    stream = model.stream_turn(request)
                    try:  # `aclosing`'s work without its object and its two coroutines per turn
                        async for event in stream:
                            # most of a turn's events are text: mapped here, without a call
                            if type(event) is m.TextDelta:
                                emitted = True
                                yield TextDelta(turn=turn, text=event.text)
                                continue
                            if type(event) is m.TurnEnd:  # the last: neither emitted nor a call begun
                                yield event
                                continue
                            mapped = _map_model_event(turn, event)
                            emitted = emitted or not isinstance(mapped, m.TurnEnd)
                            if opened is not None and type(mapped) is ToolCall:
                                opened[mapped.call_id] = mapped.name
                            yield mapped
                    finally:
                        await stream.aclose()
                    return
                except TimeoutError as err:
                    raise _timed_out(err) from err
            except ModelError as exc:
                if not exc.retryable:
                    raise model_failure(turn, exc) from exc
                if emitted:
                    raise ModelUnavailable(
                        f"model turn {turn} failed after part of it was streamed: {exc.message}"
                    ) from exc
                if attempt == retry.attempts:
                    raise ModelUnavailable(
                        f"model turn {turn} failed after {attempt} attempt(s): {exc.message}"
                    ) from exc
                # The model's own word on when to come back beats our guess.
                delay = exc.retry_after_s or wait_after(backoff, attempt)
                left = control.remaining() if control is not None else None
                too_long = bool(exc.retry_after_s) and delay > MAX_RETRY_AFTER_S
                if too_long or (left is not None and delay >= left):
                    # a wait past the run's deadline would end it DEADLINE_EXCEEDED, as if the caller had asked
                    # too little: end it now, retryable, with the model's reason
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
                # the caller would otherwise see nothing for as long as the wait and the next try take
                yield ev.ModelRetry(
                    turn=turn, attempt=attempt, max_attempts=retry.attempts, wait_s=delay, error=exc.message
                )
                await sleep(delay)
    except BaseException as exc:
        failure = exc
        raise
    finally:
        telemetry.MODEL_TURN.observe(clock() - started)
        if span is not None:
            telemetry.end_span(span, failure)
        # This frame holds the exception and the exception's traceback holds this frame: without this, every
        # cancelled or failed turn leaves a reference cycle for the collector.
        failure = None


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
