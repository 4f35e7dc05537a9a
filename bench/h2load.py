"""h2load (Debian's `nghttp2-client`), the load generator written in C that drives the systems for the time to first
byte and request times: gRPC over h2c as POSTs of one pre-serialized `RunAgentRequest`, SSE over HTTP/1.1 (`--h1`).
A Python load process saturates long before the servers do at C = 1000, and then measures itself; h2load spends a
few µs per stream.

h2load reads no trailers, so a gRPC call that fails (HTTP 200, then `grpc-status` in the trailers) counts as a
success there: `validate` first plays one stream of the very same request bytes through a real client and checks
its status and events. h2load's "time to 1st byte" is per connection, from the start of connecting to the first
byte of a response body (the first event), so it is a per-stream figure only with one stream per connection.
"""

from __future__ import annotations

import json
import math
import re
import resource
import shutil
import struct
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from agent.v1 import agent_pb2 as pb
from bench.procs import A2A_PYTHON, SSE_FACE, Server, child_env
from bench.workload import Workload, timeline

HINT = "install Debian's nghttp2-client (`apt-get install nghttp2-client`, or `make bench` as root does it)"
METHOD = "/agent.v1.AgentService/RunAgent"
A2A_METHOD = "/lf.a2a.v1.A2AService/SendStreamingMessage"
REQUEST = pb.RunAgentRequest(message="hello", tools=["bench_sleep"])


def find() -> str | None:
    return shutil.which("h2load")


def required() -> str:
    """h2load's path, or the process ends saying how to install it (a tool that has nothing to measure without it)."""
    path = find()
    if path is None:
        sys.exit(f"h2load is missing: {HINT}")
    return path


def version(path: str) -> str:
    done = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
    return done.stdout.strip() or done.stderr.strip()


@dataclass(frozen=True)
class Load:
    """`streams` streams in all, at most `per_connection` at a time on each of `connections` connections (h2load's
    clients; a connection that finishes its share closes)."""

    streams: int
    connections: int
    per_connection: int

    @classmethod
    def spread(cls, streams: int, per_connection: int, proto: str = "grpc") -> Load:
        """`streams` at once, `per_connection` on each connection; over SSE one per connection, since HTTP/1.1 does
        not multiplex (h2load's `-m` would pipeline, one response after the other)."""
        per_connection = 1 if proto == "sse" else max(1, min(streams, per_connection))
        return cls(streams, math.ceil(streams / per_connection), per_connection)


def grpc_frame(message: bytes) -> bytes:
    """gRPC's length-prefixed message: a compressed flag (0), the length as 4 bytes big-endian, then the bytes."""
    return struct.pack(">BI", 0, len(message)) + message


def request_file(folder: Path) -> Path:
    """The body h2load posts on every gRPC stream (`-d`), and `validate` sends through a real client."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "run-agent-request.bin"
    path.write_bytes(grpc_frame(REQUEST.SerializeToString()))
    return path


def a2a_available() -> bool:
    return A2A_PYTHON.exists()


def a2a_request_file(folder: Path) -> Path:
    """The A2A `SendMessageRequest` h2load posts to the A2A SDK's server, written by the SDK's own venv."""
    path = folder / "a2a-request.bin"
    _a2a("request", str(path))
    return path


def _a2a(*args: str) -> str:
    cmd = [str(A2A_PYTHON), "-m", "bench.a2a_baseline", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=True, env=child_env(), timeout=120).stdout


def body_for(server: Server, body: Path) -> Path:
    """The request file `server` gets: the A2A server's own request beside the service's."""
    return body.with_name("a2a-request.bin") if server.system == "a2a" else body


def command(h2load: str, server: Server, body: Path, load: Load, deadline: float, log: Path) -> list[str]:
    cmd = [h2load, "-n", str(load.streams), "-c", str(load.connections), "-m", str(load.per_connection), "-t", "1"]
    cmd += ["-T", f"{deadline:g}", "--log-file", str(log)]
    if server.system == SSE_FACE:  # the HTTP face: POST the request in protobuf JSON
        json_body = body.with_name("run-agent-request.json")
        json_body.write_text(json_format.MessageToJson(REQUEST))
        return [*cmd, "--h1", "-d", str(json_body), "-H", "content-type: application/json", server.target]
    if server.proto == "sse":
        return [*cmd, "--h1", f"{server.target}?message=hello"]
    cmd += ["-d", str(body_for(server, body)), "-H", "content-type: application/grpc", "-H", "te: trailers"]
    return [*cmd, f"http://{server.target}{A2A_METHOD if server.system == 'a2a' else METHOD}"]


_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0}
_DURATION = re.compile(r"^([\d.]+)(us|ms|s)$")
_STAT_ROWS = {"time for request": "request", "time for connect": "connect", "time to 1st byte": "ttfb"}


def seconds(text: str) -> float:
    match = _DURATION.match(text)
    if match is None:
        raise ValueError(f"not an h2load duration: {text!r}")
    return float(match[1]) * _UNITS[match[2]]


def parse(text: str) -> dict[str, Any]:
    """h2load's summary: the run's time and rate, request counts, body bytes, and min/max/mean/sd (seconds) of the
    request times, connect times and times to first byte. Raises ValueError when a line it needs is missing."""
    out: dict[str, Any] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := re.match(r"finished in (\S+), ([\d.]+) req/s", line):
            out["finished_s"], out["req_per_s"] = seconds(m[1]), float(m[2])
        elif line.startswith("requests:"):
            out["requests"] = {name: int(n) for n, name in re.findall(r"(\d+) (\w+)", line)}
        elif m := re.match(r"traffic: .*\((\d+)\) data$", line):
            out["data_bytes"] = int(m[1])
        elif (name := line.partition(":")[0].strip()) in _STAT_ROWS:
            cells = line.partition(":")[2].split()
            out[_STAT_ROWS[name]] = dict(zip(("min", "max", "mean", "sd"), map(seconds, cells[:4]), strict=True))
    missing = {"finished_s", "requests", "data_bytes", "request", "ttfb"} - out.keys()
    if missing:
        raise ValueError(f"h2load output without {sorted(missing)}: {text[-1000:]!r}")
    return out


def request_times(log: Path) -> list[float]:
    """Seconds per request from `--log-file` (tab-separated: start in µs since the epoch, status, duration µs)."""
    if not log.exists():
        return []
    rows = (line.split("\t") for line in log.read_text().splitlines() if line.strip())
    return [int(r[2]) / 1e6 for r in rows if len(r) >= 3 and r[1].startswith("2")]


def run(h2load: str, server: Server, body: Path, load: Load, deadline: float) -> dict[str, Any]:
    """One h2load run: its parsed summary, its per-request times, and its CPU time as a share of one core over the
    run (`load_cpu_pct`; h2load runs one thread)."""
    log = body.with_name(f"h2load-{server.port}.log")
    log.unlink(missing_ok=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(
        command(h2load, server, body, load, deadline, log),
        capture_output=True,
        text=True,
        timeout=deadline + 60,
    )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr[-2000:]}{done.stdout[-2000:]}")
    out = parse(done.stdout)
    # Servers are reaped only when stopped, so the children's CPU time gained here is h2load's.
    out["load_cpu_s"] = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    out["wall_s"] = wall
    out["load_cpu_pct"] = 100 * out["load_cpu_s"] / wall
    out["times"] = request_times(log)
    return out


def expected_events(workload: Workload) -> tuple[list[str], str]:
    """The kinds of the events one run sends other than text deltas, and the text the deltas add up to."""
    steps = timeline(workload)
    return [s.kind for s in steps if s.kind != "text_delta"], "".join(s.text for s in steps if s.kind == "text_delta")


def check(events: list[tuple[str, str]], workload: Workload, exact: bool) -> list[str]:
    """What is wrong with one stream's (kind, text) events against the workload's timeline: every event but the
    text deltas in order, the same text, and with `exact` (a system that merges no deltas) as many events."""
    kinds, text = expected_events(workload)
    problems = []
    got_kinds = [k for k, _ in events if k != "text_delta"]
    if got_kinds != kinds:
        problems.append(f"events {got_kinds} where the workload sends {kinds}")
    got_text = "".join(t for k, t in events if k == "text_delta")
    if got_text != text:
        problems.append(f"text {got_text[:80]!r}… where the workload sends {text[:80]!r}…")
    if exact and len(events) != len(timeline(workload)):
        problems.append(f"{len(events)} events where the workload sends {len(timeline(workload))}")
    return problems


def validate(server: Server, body: Path, workload: Workload, exact: bool, deadline: float) -> dict[str, Any]:
    """One stream through a real client, before h2load's: the gRPC call posts `body`'s very message. Raises
    RuntimeError when the status is not OK (200 over SSE) or the events are not the workload's."""
    if server.system == SSE_FACE:
        status, events, size = _face_stream(server.target, deadline)
    elif server.proto == "sse":
        status, events, size = _sse_stream(server.target, deadline)
    elif server.system == "a2a":  # A2A's messages decode only in the SDK's venv
        got = json.loads(_a2a("validate", server.target, str(body_for(server, body)), f"{deadline:g}"))
        status, events, size = got["status"], [tuple(e) for e in got["events"]], got["body_bytes"]
    else:
        status, events, size = _grpc_stream(server.target, body.read_bytes()[5:], deadline)
    problems = [] if status in ("OK", "200") else [f"status {status}"]
    problems += check(events, workload, exact)
    if problems:
        raise RuntimeError(f"{server.system}: the validating stream is wrong: {'; '.join(problems)}")
    return {"status": status, "events": len(events), "body_bytes": size}


def _grpc_stream(target: str, message: bytes, deadline: float) -> tuple[str, list[tuple[str, str]], int]:
    with grpc.insecure_channel(target) as channel:
        # bytes in, bytes out: the request is the file's message as it is, not a freshly built one
        call = channel.unary_stream(METHOD, request_serializer=None, response_deserializer=None)
        events, size = [], 0
        try:
            for raw in call(message, timeout=deadline):
                size += 5 + len(raw)
                event = pb.AgentEvent.FromString(raw)
                kind = str(event.WhichOneof("event"))
                events.append((kind, event.text_delta.text if kind == "text_delta" else ""))
        except grpc.RpcError as exc:
            return exc.code().name, events, size
    return "OK", events, size


def _sse_stream(url: str, deadline: float) -> tuple[str, list[tuple[str, str]], int]:
    events, size = [], 0
    with urllib.request.urlopen(f"{url}?message=hello", timeout=deadline) as resp:
        for line in resp:
            size += len(line)
            if line.startswith(b"data:"):
                data = json.loads(line[5:])
                events.append((data["kind"], data.get("text", "") if data["kind"] == "text_delta" else ""))
        return str(resp.status), events, size


def _face_stream(url: str, deadline: float) -> tuple[str, list[tuple[str, str]], int]:
    """The service's HTTP face: the same request as over gRPC, events named by `event:`, data in protobuf JSON."""
    body = json_format.MessageToJson(REQUEST).encode()
    post = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
    events, size, kind = [], 0, ""
    with urllib.request.urlopen(post, timeout=deadline) as resp:
        for line in resp:
            size += len(line)
            if line.startswith(b"event:"):
                kind = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = json.loads(line[5:])
                events.append((kind, data["textDelta"].get("text", "") if kind == "text_delta" else ""))
        return str(resp.status), events, size
