"""How much earlier than the caller's gRPC deadline a run must end for its `error` event to reach the caller.

A caller's deadline travels as a timeout in the `grpc-timeout` header, and the server knows only that header. gRPC's
C core (grpcio, and every client built on it) rounds the timeout UP to three significant figures before sending it
(whole milliseconds under 1 s; 10 ms steps to 10 s, 100 ms to 100 s, whole seconds to 1000 s, and so on, into
minutes and hours further on): a 100.2 s timeout arrives as 101 s, a 119.2 s one as 2 minutes. A client that
writes the header in the finest unit its 8 digits allow (grpc-go, for one) rounds it by at most a millisecond below
27 hours. The server's view of the deadline can so be later than the caller's by nearly one step of the header's
precision at that magnitude; a fixed margin alone (50 ms) is below that step from 10 s on, and the caller's deadline
then cuts the stream before the run's `DEADLINE_EXCEEDED` event is sent.

The C core also compresses the header: when a call's timeout is shorter than one it sent on the same connection by
less than 3 % (of the earlier one, as rounded), it sends the earlier value again (HPACK's indexed form). So a caller
sending calls with similar deadlines on one channel can be seen with a timeout 3 % longer than its own: an outside
finding, a 2.915 s call sent 50 ms after a 3.0 s one arrived as 2.999 s, and got no error event (REUSED_SHARE).
"""

from __future__ import annotations

import math

from service.coalesce import CALM_BUSY, SATURATED_BUSY

_MILLISECOND = 0.001


def header_rounding_s(timeout_s: float) -> float:
    """The most a caller's timeout of about `timeout_s` (as the server sees it) may have been rounded up on the way:
    one step of its third significant figure, at least a millisecond."""
    if timeout_s < 1.0:
        return _MILLISECOND
    if timeout_s < 100_000:
        return float(10 ** (math.floor(math.log10(timeout_s)) - 2))
    return 6000.0  # past 100,000 s the C core sends 10-minute steps, then 100-minute ones, then hours


WAITED_SHARE = 0.01
"""The share of its timeout a call may have waited, after its header was read, before the servicer reads what is
left: the header's magnitude (which decides its rounding) is taken as up to this much more than what is left. Just
below a power of ten that costs one step more; a call that waited longer than this and whose header lay just above
one (a 10.001 s timeout sent as 10.1 s, read after 0.2 s) can be left less than the fixed part."""


MIN_RUN_S = 0.01
"""A call whose deadline leaves a run less than this, its margin taken, is refused (DEADLINE_EXCEEDED) before a run
starts: a run that sends `run_started` and its `error` event within a few milliseconds did not get the second out
before the caller's deadline (an outside finding: 1-10 ms deadlines; from 20 ms on every one arrived)."""


REUSED_SHARE = 0.031
"""How much longer than the caller's own a timeout read on the server may be because the C core sent an earlier call's
header again (see the module): under 3 % of that earlier timeout, plus a step of its rounding (`header_rounding_s`)."""


BUSY_SHARE = 0.25
"""The most of what is left that the busy part of the margin may take: a short deadline on a saturated server still
leaves its run three quarters of it."""


def run_margin_s(remaining_s: float, fixed_s: float, *, busy: float = 0.0, busy_s: float = 0.0) -> float:
    """How long before the server's deadline (`remaining_s` away) the run ends: the header's rounding and its reuse
    (REUSED_SHARE), plus `fixed_s` (`runs.deadline_margin_s`: for the error event to be sent and to travel back)
    but never more than a tenth of what is left, so that a short deadline is not eaten by it; plus, as the event
    loop's busy share (`LoopLoad.busy`, 0 to 1) goes from half a core to saturated, up to `busy_s` more
    (`runs.deadline_busy_margin_s`) but never more than BUSY_SHARE of what is left.

    Why the busy part: on a saturated loop the error event waits behind every other call's work, between the run's
    log and the stream (~40 ms at the 90th percentile) and in grpc's send (~20 ms), and 50 ms was not enough. With
    400 paced streams on 2 cores (the loop 91 % busy), 34 of 240 calls whose deadline fell inside the run got no
    `error` event; with 100 ms 3 of 240, with 150 ms none. At 74 % busy 50 ms was enough (0 of 240)."""
    pressure = min(1.0, max(0.0, (busy - CALM_BUSY) / (SATURATED_BUSY - CALM_BUSY)))
    return (
        header_rounding_s(remaining_s * (1 + WAITED_SHARE))
        + remaining_s * REUSED_SHARE
        + min(fixed_s, remaining_s / 10)
        + min(busy_s * pressure, remaining_s * BUSY_SHARE)
    )
