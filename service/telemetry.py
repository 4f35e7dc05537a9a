"""Prometheus metrics and structured JSON logging (one line per event of interest)."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

# 1 ms to 60 s, roughly doubling: tool calls span cache hits to slow upstream APIs.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)

TOOL_CALLS = Counter("agent_tool_calls_total", "Tool calls by tool and outcome", ["tool", "outcome"])
TOOL_LATENCY = Histogram(
    "agent_tool_call_duration_seconds", "Tool call latency by tool", ["tool"], buckets=LATENCY_BUCKETS
)
RUNS = Counter("agent_runs_total", "Runs by outcome (gRPC status code name)", ["outcome"])
ACTIVE_RUNS = Gauge("agent_active_runs", "Runs in progress")
FIRST_EVENT = Histogram(
    "agent_time_to_first_event_seconds", "From request to the first event sent", buckets=LATENCY_BUCKETS
)
MODEL_TURN = Histogram(
    "agent_model_turn_duration_seconds", "Model turn latency, first request to end of stream", buckets=LATENCY_BUCKETS
)
MODEL_RETRIES = Counter("agent_model_retries_total", "Model turns retried after a retryable failure")
EVENTS = Counter("agent_events_sent_total", "Events sent to callers by kind", ["kind"])


def record_tool_call(tool: str, outcome: str, seconds: float) -> None:
    TOOL_CALLS.labels(tool, outcome).inc()
    TOOL_LATENCY.labels(tool).observe(seconds)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any `extra=` fields."""

    _STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update({k: v for k, v in record.__dict__.items() if k not in self._STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
