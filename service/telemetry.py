"""Prometheus metrics, OpenTelemetry tracing and structured JSON logging (one line per event of interest).

Metrics are kept in this process, or, under `--workers N` (`service/rpc/workers.py`), in prometheus_client's
multiprocess mode: each worker writes its values to files in `PROMETHEUS_MULTIPROC_DIR` and the supervisor serves
their aggregate. A gauge's `multiprocess_mode` says how the workers' values combine (ignored by one process).

Tracing is off by default and then costs next to nothing (the API's no-op tracer). It is switched on only by the
standard environment variables: an OTLP exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is
set, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none`; `OTEL_SERVICE_NAME` and the other `OTEL_*`
variables are read by the SDK itself.
"""

from __future__ import annotations

import atexit
import contextvars
import functools
import json
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from prometheus_client import Counter, Gauge, Histogram

from service import redact, tally
from service.redact import Redactor
from service.sent import EVENTS as EVENTS  # the events-sent story: service/sent.py

log = logging.getLogger(__name__)

# 1 ms to 60 s, roughly doubling: tool calls span cache hits to slow upstream APIs.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

TOOL_CALLS = Counter("agent_tool_calls_total", "Tool calls by tool and outcome", ["tool", "outcome"])
TOOL_LATENCY = Histogram(
    "agent_tool_call_duration_seconds", "Tool call latency by tool", ["tool"], buckets=LATENCY_BUCKETS
)
RUNS = Counter("agent_runs_total", "Runs by outcome (gRPC status code name)", ["outcome"])
ACTIVE_RUNS = Gauge("agent_active_runs", "Runs in progress", multiprocess_mode="livesum")
# 100 µs to 30 s: a first event is usually sent within a millisecond of the call's start (about 0.3 ms here, all of
# it in the 1 ms bucket before), and seconds only when the process is saturated.
FIRST_EVENT_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30
)  # fmt: skip
FIRST_EVENT = tally.histogram(  # observed once per call: through a tally (service/tally.py), no lock per call
    Histogram(
        "agent_time_to_first_event_seconds",
        "From the start of a RunAgent call to its first event sent",
        buckets=FIRST_EVENT_BUCKETS,
    )
)
# 50 ms to 10 min: a turn streams a whole answer, and its retries (three tries of up to model.timeout_s, 120 s, each)
# are in it; with the tools' buckets every turn longer than a minute fell in +Inf.
MODEL_TURN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 180, 300, 600)
MODEL_TURN = tally.histogram(
    Histogram(
        "agent_model_turn_duration_seconds",
        "Model turn latency, first request to end of stream",
        buckets=MODEL_TURN_BUCKETS,
    )
)
MODEL_RETRIES = Counter("agent_model_retries_total", "Model turns retried after a retryable failure")
MODEL_TOKENS = Counter(
    "agent_model_tokens_total", "Tokens of completed model turns, as the model reported them", ["kind"]
)  # kind: input, output; no model label: the model is the caller's to name
# the HTTP face's requests (the gRPC face's are counted by the RPC's own status): `route` is the route's template
HTTP_REQUESTS = Counter("agent_http_requests_total", "HTTP face requests by route and status", ["route", "status"])
# Each worker's own loop, by `pid`: a sum means nothing, and a saturated worker must show beside an idle one.
LOOP_LAG = Gauge(
    "agent_event_loop_lag_seconds", "How late the event loop wakes a timer (smoothed)", multiprocess_mode="liveall"
)
LOOP_BUSY = Gauge(
    "agent_event_loop_busy_ratio",
    "Share of a core the event loop thread uses (smoothed, 0 to 1)",
    multiprocess_mode="liveall",
)
TOOL_RETRIES = Counter("agent_tool_retries_total", "Tool call attempts retried after a transient failure", ["tool"])
# The worst state any worker sees: with `scope: process` one worker's circuit may be open while another's is closed.
CIRCUIT_STATE = Gauge(
    "agent_tool_circuit_state",
    "Circuit breaker state: 0 closed, 1 half-open, 2 open",
    ["tool"],
    multiprocess_mode="livemax",
)
CIRCUIT_TRANSITIONS = Counter(
    "agent_tool_circuit_transitions_total", "Circuit breaker state changes", ["tool", "from", "to"]
)
RATE_LIMIT_WAIT = Histogram(
    "agent_tool_rate_limit_wait_seconds", "Time calls waited for rate-limit capacity", ["tool"], buckets=LATENCY_BUCKETS
)
RATE_LIMITED = Counter("agent_tool_rate_limited_total", "Calls rejected by a rate limit", ["tool"])
CACHE_HITS = Counter("agent_tool_cache_hits_total", "Calls answered from the result cache", ["tool"])
STATE_DEGRADED = Counter(
    "agent_state_degraded_total", "Times a part found the shared state (Redis) unreachable and went local", ["part"]
)
STATE_DEGRADED_NOW = Gauge(
    "agent_state_unreachable",
    "1 while a part runs on this process's own state, the shared state unreachable",
    ["part"],
    multiprocess_mode="livemax",  # 1 while any worker is on its own
)
FALLBACKS = Counter("agent_tool_fallbacks_total", "Calls handed to the fallback tool", ["tool", "fallback"])
DEAD_LETTERS = Counter("agent_tool_dead_letters_total", "Calls that finally failed and were dead-lettered", ["tool"])
# Under --workers: up is the worst a live worker sees (min), what waits is summed over them (the spool is shared).
RECORDS_UP = Gauge(
    "agent_records_up",
    "1 while the records database (records.url) answers; 0 while records spool",
    multiprocess_mode="livemin",
)
RECORDS_PENDING = Gauge(
    "agent_records_pending",
    "Records waiting in the local spool for the records database",
    multiprocess_mode="livemax",
)
RECORDS_QUARANTINED = Gauge(
    "agent_records_quarantined",
    "Records the records database kept refusing, kept in the local spool's quarantine for an operator",
    multiprocess_mode="livemax",  # the workers of a machine share the spool file
)
# the shared run-state store (state.url redis://); absent from a memory:// service's scrape until it sets them
STATE_UP = Gauge(
    "agent_state_store_up",
    "1 while the shared run-state store answers, 0 while it cannot be reached",
    multiprocess_mode="livemin",
)
PUSH_DELIVERIES = Counter(
    "agent_push_deliveries_total",
    "Completion push attempts by outcome: delivered (2xx), failed (retried later), refused (the SSRF guard), expired",
    ["outcome"],
)
STATE_ERRORS = Counter("agent_state_store_errors_total", "Failed operations on the shared run-state store")
STATE_UNSHIPPED = Gauge(
    "agent_state_unshipped_events",
    "Events logged here and not yet in the shared store",
    multiprocess_mode="livesum",
)


# The counters added to per call go through `tally` (service/tally.py): no lock per call, flushed at each scrape.
ACTIVE = (ACTIVE_RUNS,)
TOKENS_IN, TOKENS_OUT = (MODEL_TOKENS, "input"), (MODEL_TOKENS, "output")


UNKNOWN_TOOL = "(unknown)"
"""The `tool` label of a call to a tool the executor does not have: the model names a call's tool, and each name it
makes up would otherwise be a new series (and a new entry in `child`'s cache) for as long as the process lives."""


@functools.lru_cache(maxsize=4096)  # label sets are few (tools, event kinds, outcomes); bounded all the same
def child(metric: Any, *labels: str) -> Any:
    """`metric.labels(*labels)`, looked up once per label set: `labels()` takes a lock, checks and joins the labels
    into a key (about 1.5 µs), which shows on paths that run per stream, per event or per tool call. The child stays
    valid: nothing here removes a label set from its metric."""
    return metric.labels(*labels)


@functools.lru_cache(maxsize=4096)
def tallied(metric: Any, *labels: str) -> tally.Observer:
    """`metric.labels(*labels)` (of a Histogram) observed through a tally (service/tally.py), made once per label set:
    per tool call, a prometheus `observe` (two locks, the buckets walked in Python) was an eighth of the executor's
    instructions."""
    return tally.histogram(metric.labels(*labels))


def record_tool_call(tool: str, outcome: str, seconds: float) -> None:
    tally.add((TOOL_CALLS, tool, outcome))
    tallied(TOOL_LATENCY, tool).observe(seconds)


_tracer: trace.Tracer = trace.NoOpTracer()
_provider: trace.TracerProvider | None = None
_tracing = False


def tracer() -> trace.Tracer:
    """The service's tracer: a no-op one unless tracing was set up."""
    return _tracer


def tracing_enabled() -> bool:
    return _tracing


def tracer_provider() -> trace.TracerProvider | None:
    """The provider traces go to, None when not tracing (the transport's interceptor traces calls with it)."""
    return _provider


def use_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Trace with `provider` (tests pass one with an in-memory exporter), or stop tracing with None. The global
    provider is left alone: OpenTelemetry allows setting it once per process."""
    global _tracer, _tracing, _provider
    _tracing, _provider = provider is not None, provider
    _tracer = provider.get_tracer("agent-service") if provider is not None else trace.NoOpTracer()


def setup_tracing() -> bool:
    """Configure the OpenTelemetry SDK from the standard environment variables; True when traces are exported."""
    if _tracing:
        return True
    env = os.environ
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    disabled = env.get("OTEL_SDK_DISABLED", "").lower() == "true" or env.get("OTEL_TRACES_EXPORTER") == "none"
    if not endpoint or disabled:
        return False
    # Imported here so that a process without tracing never loads the SDK or the exporter.
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    resource = Resource.create({} if env.get("OTEL_SERVICE_NAME") else {"service.name": "agent-service"})
    # the SDK's own exit handler would wait for the collector without a useful bound: ours below waits a little
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    use_tracer_provider(provider)
    atexit.unregister(shutdown)  # once, however often tracing is set up
    atexit.register(shutdown)
    return True


SHUTDOWN_FLUSH_S = 2.0
"""How long the exit waits for the spans still queued to be exported. An unreachable collector would otherwise hold
it for the exporter's timeout per batch (10 s) up to the batch processor's 30 s: past the pod's termination grace
period, which the drain has already used up (k8s/deployment.yaml)."""


def shutdown(timeout_s: float = SHUTDOWN_FLUSH_S) -> None:
    """Flush and stop the span exporter, waiting at most `timeout_s`: spans not sent by then are dropped. Runs at
    exit, and is called by a process that ends without running its exit handlers."""
    shutdown_provider = getattr(_provider, "shutdown", None)
    if shutdown_provider is None:
        return
    # on a thread of its own, which the exit does not wait for: the SDK's shutdown takes no timeout
    flush = threading.Thread(target=shutdown_provider, name="span exporter shutdown", daemon=True)
    flush.start()
    flush.join(timeout_s)
    if flush.is_alive():
        log.warning("spans not exported within %g s of shutdown were dropped", timeout_s)


def end_span(span: trace.Span, error: BaseException | str | None = None, redactor: Redactor | None = None) -> None:
    """End `span`, ERROR when `error` is given, so that no span of ours is left UNSET on a failure or cancel. The
    error text is redacted (`redactor`, else the process-wide one)."""
    if error is not None and span.is_recording():
        redactor = redactor or redact.active()
        if isinstance(error, BaseException):
            masked: dict[str, Any] | None = None
            if redactor.enabled:
                stack = "".join(traceback.format_exception(error))
                masked = {"exception.message": redactor.text(str(error)), "exception.stacktrace": redactor.text(stack)}
            span.record_exception(error, attributes=masked)
            description = f"{type(error).__name__}: {error}"
        else:
            description = error
        span.set_status(trace.Status(trace.StatusCode.ERROR, redactor.text(description)))
    span.end()


def span_ids(span: trace.Span | None = None) -> dict[str, str]:
    """trace_id and span_id (hex) of `span` (or the current one) for a log line; empty when not tracing."""
    context = (span or trace.get_current_span()).get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields. Configured fields and patterns
    are masked in the message arguments, the extra fields and the traceback (`redactor`, else the process-wide one)."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def __init__(self, redactor: Redactor | None = None, fields: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.redactor = redactor
        self.fields = dict(fields or {})  # on every line: a worker's index tells its lines apart

    def format(self, record: logging.LogRecord) -> str:
        redactor = self.redactor or redact.active()
        extra = {k: v for k, v in record.__dict__.items() if k not in self._STANDARD}
        out: dict[str, Any] = {
            "ts": f"{_second(int(record.created))}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": _message(record, redactor) if redactor.enabled else record.getMessage(),
            **self.fields,
        }
        out.update(redactor.value(extra))
        if "trace_id" not in out and _tracing:
            out.update(span_ids())
        if record.exc_info:
            out["exc"] = redactor.text(self.formatException(record.exc_info))
        return json.dumps(out, default=lambda v: redactor.text(str(v)))


@functools.lru_cache(maxsize=4)
def _second(epoch_s: int) -> str:
    """The UTC time of a whole second, as lines of the same second share it."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(epoch_s))


def _message(record: logging.LogRecord, redactor: Redactor) -> str:
    """The formatted message with its arguments redacted first (so a dict argument's fields are masked by key)."""
    message = str(record.msg)
    if record.args:
        try:
            message = message % redactor.value(record.args)
        except (TypeError, ValueError, KeyError):
            message = record.getMessage()
    return redactor.text(message)


_run_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("run_id", default=None)


def bind_run(run_id: str) -> None:
    """Mark the current context as run `run_id`'s: every line logged in it carries the run id, and so do the lines of
    the tasks and `asyncio.to_thread` calls it starts, which copy the context (tool calls, the model's SDK). Called
    first in the run's own task, whose context is its own copy: nothing outside the run sees the mark."""
    _run_id.set(run_id)


class RunIdFilter(logging.Filter):
    """Adds `run_id` to a record logged inside a run (`bind_run`) that does not name one itself. A filter on the
    handler runs on the thread that logs, where the run's context is; a formatter may run later, elsewhere."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "run_id" not in record.__dict__:
            run_id = _run_id.get()
            if run_id is not None:
                record.run_id = run_id
        return True


def json_handler(stream: Any, fields: Mapping[str, Any] | None = None) -> logging.Handler:
    """The service's log handler: JSON lines on `stream`, each logged inside a run carrying its id, and every one
    carrying `fields`."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter(fields=fields))
    handler.addFilter(RunIdFilter())
    return handler


def lean_log_records() -> None:
    """The JSON lines carry none of the caller's file, line, thread or process: stop `logging` from working them out
    for every record (a third of the cost of a log call: 62 -> 41 µs, docs/performance-log.md). Process-wide."""
    logging._srcfile = None
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False


# HTTP clients that log every request's full URL at INFO: a webhook's query-string token, a tool URL's userinfo (an
# outside finding); the service logs what it needs of its own requests, so theirs are kept to warnings
QUIET_LOGGERS = ("httpx", "httpcore")


def setup_logging(level: str = "INFO", fields: Mapping[str, Any] | None = None) -> None:
    lean_log_records()
    root = logging.getLogger()
    root.handlers[:] = [json_handler(sys.stderr, fields)]
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def context_with(span: trace.Span) -> Any:
    """An OpenTelemetry context whose current span is `span`: the explicit parent for child spans."""
    return trace.set_span_in_context(span)
