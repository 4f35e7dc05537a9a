"""A run's gRPC stream as one async generator: the checks of the interceptors, opening the run, reading its log,
the protobuf, the count of events sent and the call's status, all in the frame grpc iterates. Each generator layer
between grpc and the log costs every event a hop (an `asend`, a frame resumed and suspended) and every call a
generator and its registration; a stream used to pass through four (the interceptor's wrapper, the status
boundary, the stream, `Run.follow`), now one.

`run_stream(opener)` makes the handler. An interceptor that would wrap it (`interceptors.wrap_handler`) asks it for
a variant that runs the interceptor's checks first (`with_checks`) instead of wrapping it in a generator of its own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import MethodType
from typing import Any

import grpc

from agent.v1 import agent_pb2 as pb
from service import events as ev
from service import telemetry
from service.errors import AgentError, SubscriberTooSlow
from service.rpc.convert import to_proto
from service.rpc.interceptors import Check
from service.rpc.status import end_call, fail, refuse
from service.run import Run, RunState
from service.sent import SENT

log = logging.getLogger(__name__)

_SUCCEEDED = RunState.SUCCEEDED
# a run's `error` event says its code, message and whether a retry may work, not which error it was: its ErrorInfo
# names the run's failure as such
RUN_FAILED = "RUN_FAILED"  # a run that succeeded did not fail: its call ends OK, without a look at its outcome

# (servicer, request, context) -> the run, the seq to send after, and whether this stream owns the run
Opener = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[tuple[Run, int, bool]]]
Handler = Callable[[Any, Any, grpc.aio.ServicerContext], AsyncIterator[pb.AgentEvent]]


def run_stream(opener: Opener, *, timed: bool = False) -> Handler:
    """The handler of a call that streams a run: `opener` opens the run; `timed` observes the time to the first
    event sent (RunAgent's, from the call's start)."""
    handler = _make(opener, timed, ())

    def with_checks(servicer: Any, checks: Sequence[Check]) -> Any:
        """This handler, bound to `servicer`, running `checks` first: an interceptor's guard without its layer."""
        return MethodType(_make(opener, timed, tuple(checks)), servicer)

    handler.with_checks = with_checks  # type: ignore[attr-defined]
    return handler


async def _opened(servicer: Any, opened: Callable[[], Awaitable[tuple[Run, int, bool]]], context: Any) -> Any:
    return await opened()


def _make(opener: Opener, timed: bool, checks: tuple[Check, ...], *, boundary: bool = True) -> Handler:
    async def stream(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.AgentEvent]:
        for check in checks:
            refusal = check(request, context)
            if refusal is not None:
                refuse(context, refusal)
                return
        received = self.clock() if timed else 0.0
        api = self.api
        # the events sent by kind, counted straight in the tally (service/sent.py) and inline, not through a method
        counts = SENT
        firsts = self.firsts
        starting = timed  # a new call (RunAgent) holds the streams under way until it has sent its first event
        firsts.pending += starting
        try:
            run, after_seq, owner = await opener(self, request, context)
            runs = api.config.runs
            cursor = run.cursor(after_seq, coalesce_lag=runs.subscriber_coalesce_lag, max_lag=runs.subscriber_max_lag)
            run_id = run.id
            try:
                with api.streaming(run, owner=owner):
                    while True:
                        entry = cursor.take()
                        if entry is None:
                            waiter = cursor.more()
                            if waiter is None:
                                break
                            await waiter
                            continue
                        seq, time_ns, event, first_seq = entry
                        message = to_proto(event, run_id, seq, time_ns, first_seq)  # positional: 350 instructions less
                        counts[type(event)] += 1
                        if firsts.pending and not starting and not run.finished:
                            # a new call's first event goes first (service/rpc/firsts.py), not past the deadline
                            await firsts.wait(run.control.deadline)
                        yield message
                        if starting:  # grpc asks for the next message once it has sent this one
                            starting = False
                            firsts.end()
                            telemetry.FIRST_EVENT.observe(self.clock() - received)
            except SubscriberTooSlow as exc:
                log.warning("slow subscriber dropped", extra={"run_id": run.id, "last_seq": exc.last_seq})
                raise  # RESOURCE_EXHAUSTED, telling it where to resume
            if run.state is not _SUCCEEDED:  # a call less a stream of a run that succeeded: 2,300 instructions
                ended_with_failure(run, context)
        except Exception as exc:
            if not boundary:
                raise
            if isinstance(exc, AgentError):
                refuse(context, exc)
            else:
                fail(context, opener.__qualname__)
        finally:
            if starting:  # it ended (refused, failed, cancelled) before its first event was sent; a call less when
                firsts.end()  # it did not (a short call's stream 110,300 -> 109,300 instructions)

    return stream


follow_opened = _make(_opened, False, (), boundary=False)
"""`follow_opened(servicer, opened, context)`: the events of the run `opened()` opens (the run, the seq to send
after, whether this stream owns it), its errors raised (for a stream merged with others: `Interact`)."""


def ended_with_failure(run: Run, context: grpc.aio.ServicerContext) -> bool:
    """True when the run failed; the call then ends with the failure's status code and message."""
    outcome = run.outcome
    if isinstance(outcome, ev.RunFailed):
        end_call(context, outcome.code, outcome.message, reason=RUN_FAILED, retryable=outcome.retryable)
        return True
    return False
