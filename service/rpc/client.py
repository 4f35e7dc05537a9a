"""`python -m service.client "question"`: run the agent and render its stream for a person (or `--json`)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
from typing import Any, TextIO

import grpc
from google.protobuf import json_format

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc


def _ms(duration: object) -> str:
    nanos = duration.ToNanoseconds()  # type: ignore[attr-defined]
    return f"{nanos / 1e6:.0f} ms" if nanos < 10e9 else f"{nanos / 1e9:.1f} s"


def _ints(value: Any) -> Any:
    """Struct holds every number as a double; show 20.0 as 20, as the model wrote it."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


class Renderer:
    """Text inline as it arrives; one line per tool call and result; a summary line at the end."""

    def __init__(self, out: TextIO, color: bool) -> None:
        self.out = out
        self.color = color
        self.at_line_start = True
        self.names: dict[str, str] = {}
        self.part_bytes: dict[str, int] = {}  # tool data that comes in parts, by call id

    def _style(self, code: str, text: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def _line(self, text: str) -> None:
        if not self.at_line_start:
            self.out.write("\n")
        self.out.write(text + "\n")
        self.at_line_start = True

    def _inline(self, text: str) -> None:
        self.out.write(text)
        self.at_line_start = text.endswith("\n")

    def event(self, event: pb.AgentEvent) -> None:
        kind = event.WhichOneof("event")
        if kind in _INTERACTION:
            self._interaction(event, kind)
        elif kind == "run_started":
            e = event.run_started
            self._line(self._style("2", f"run {event.run_id} · {e.model} · tools: {', '.join(e.tools) or 'none'}"))
        elif kind == "thinking":
            self._inline(self._style("2;3", event.thinking.text))
        elif kind == "text_delta":
            self._inline(event.text_delta.text)
        elif kind == "tool_call":
            self.names[event.tool_call.call_id] = event.tool_call.name
        elif kind == "tool_call_ready":
            e = event.tool_call_ready
            args = json.dumps(_ints(json_format.MessageToDict(e.input)), separators=(",", ":"))
            self._line(self._style("36", f"→ {e.name} {args[:200]}"))
        elif kind == "tool_retry":
            e = event.tool_retry
            self._line(
                self._style(
                    "33",
                    f"↻ {self.names.get(e.call_id, e.call_id)} retry {e.attempt}/{e.max_attempts} "
                    f"in {_ms(e.wait)}: {e.error}",
                )
            )
        elif kind == "model_retry":
            e = event.model_retry
            self._line(
                self._style(
                    "33", f"↻ model turn {e.turn} retry {e.attempt}/{e.max_attempts} in {_ms(e.wait)}: {e.error}"
                )
            )
        elif kind == "run_recovered":
            e = event.run_recovered
            self._line(self._style("33", f"↻ run recovered after turn {e.turn} (step {e.step_no}): {e.reason}"))
        elif kind == "tool_fallback":
            e = event.tool_fallback
            self._line(self._style("33", f"⇢ {e.primary} failed, falling back to {e.fallback}: {e.reason}"))
        elif kind == "tool_data_part":
            part = event.tool_data_part
            self.part_bytes[part.call_id] = self.part_bytes.get(part.call_id, 0) + len(part.json.encode())
        elif kind == "tool_result":
            e = event.tool_result
            status = pb.ToolStatus.Name(e.status).removeprefix("TOOL_STATUS_").lower()
            size = len(json_format.MessageToJson(e.data, indent=None)) if e.HasField("data") else 0
            if e.data_parts:  # too large for one event: it came in parts
                size = self.part_bytes.pop(e.call_id, 0)
            detail = f"{size} bytes" if status in ("ok", "partial") else e.error
            code = "32" if status == "ok" else "31"
            via = f", answered by {e.answered_by}" if e.answered_by else ""
            cached = ", cached" if e.cache_hit else ""
            self._line(self._style(code, f"← {e.name} {status} in {_ms(e.duration)} ({detail}{via}{cached})"))
        elif kind == "final_response":
            e = event.final_response
            summary = (
                f"— {e.turns} turn(s), {e.tool_calls} tool call(s), {e.input_tokens} in / {e.output_tokens} out "
                f"tokens, {_ms(e.duration)}"
            )
            self._line(self._style("2", summary))

    def _interaction(self, event: pb.AgentEvent, kind: str) -> None:
        """Approvals, steering, refusals (`-i`, or another party's, seen in the log) and errors."""
        if kind == "approval_required":
            e = event.approval_required
            args = json.dumps(_ints(json_format.MessageToDict(e.input)), separators=(",", ":"))
            who = ", ".join(e.approvers) or "nobody"
            self._line(self._style("35", f"? {e.name} {args[:200]} needs approval ({e.reason}); may decide: {who}"))
        elif kind == "approval_decided":
            e = event.approval_decided
            verdict = "approved" if e.approved else "denied"
            why = f": {e.reason}" if e.reason else ""
            self._line(self._style("35", f"✓ {verdict} by {e.decided_by}{why}"))
        elif kind == "input_received":
            self._line(self._style("35", f"» input from {event.input_received.sent_by}: {event.input_received.text}"))
        elif event.seq == 0:  # Interact: a message of ours the run could not take; the run goes on
            self._line(self._style("33", f"refused: {event.error.message}"))
        else:
            e = event.error
            self._line(self._style("31", f"error {e.code}: {e.message}" + (" (retryable)" if e.retryable else "")))


_INTERACTION = frozenset({"approval_required", "approval_decided", "input_received", "error"})


def _token(path: str | None) -> str:
    """The bearer token: from a file, else `AGENT_TOKEN`; never an argument, which every user of the machine sees in
    `ps` and the shell keeps in its history."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    return os.environ.get("AGENT_TOKEN", "").strip()


def _request(args: argparse.Namespace) -> pb.RunAgentRequest:
    request = pb.RunAgentRequest(message=args.message, tools=args.tools or [], model=args.model or "")
    if args.max_turns is not None:
        request.max_turns = args.max_turns
    if args.system is not None:
        request.system = args.system
    return request


MAX_TIMEOUT_S = 1e8  # over three years


def _seconds(text: str) -> float:
    """A deadline: a positive, finite number of seconds. gRPC takes 0 or less as already past (every call fails at
    once with DEADLINE_EXCEEDED) and infinity as no deadline at all."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    if value > MAX_TIMEOUT_S:  # grpc's deadline arithmetic overflows past about 1e9 s: every call would fail at once
        raise argparse.ArgumentTypeError(f"must be at most {MAX_TIMEOUT_S:.0f} seconds, got {text}")
    return value


def _metadata(args: argparse.Namespace) -> tuple[tuple[str, str], ...] | None:
    token = _token(args.token_file)
    return (("authorization", f"Bearer {token}"),) if token else None


def _channel(args: argparse.Namespace) -> grpc.aio.Channel:
    """Plaintext, or TLS when a CA file is given (with a client certificate and key for mutual TLS)."""
    if not args.ca_file:
        if args.cert_file or args.key_file:
            raise SystemExit("error: --cert-file and --key-file need --ca-file (TLS)")
        return grpc.aio.insecure_channel(args.target)
    if bool(args.cert_file) != bool(args.key_file):
        raise SystemExit("error: --cert-file and --key-file go together")

    def read(path: str | None) -> bytes | None:
        if not path:
            return None
        with open(path, "rb") as f:
            return f.read()

    credentials = grpc.ssl_channel_credentials(
        root_certificates=read(args.ca_file), private_key=read(args.key_file), certificate_chain=read(args.cert_file)
    )
    return grpc.aio.secure_channel(args.target, credentials)


async def run(args: argparse.Namespace, out: TextIO) -> int:
    if args.interactive:
        from service.rpc.interactive_client import converse  # noqa: PLC0415  (only this mode needs it)

        return await converse(args, _request(args), _channel(args), _metadata(args), out)
    request = _request(args)
    renderer = Renderer(out, color=not args.no_color and out.isatty())
    metadata = _metadata(args)
    async with _channel(args) as channel:
        call = agent_pb2_grpc.AgentServiceStub(channel).RunAgent(request, timeout=args.timeout, metadata=metadata)
        try:
            async for event in call:
                if args.json:
                    out.write(json.dumps(json_format.MessageToDict(event), separators=(",", ":")) + "\n")
                else:
                    renderer.event(event)
                out.flush()
        except grpc.aio.AioRpcError as exc:
            print(f"{exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service.client", description="Run the agent and watch it work")
    parser.add_argument("message", help="the question for the agent")
    parser.add_argument("--target", default=os.environ.get("AGENT_TARGET", "127.0.0.1:50051"), help="HOST:PORT")
    parser.add_argument("--json", action="store_true", help="print raw events, one JSON object per line")
    parser.add_argument("--tools", type=lambda s: [t for t in s.split(",") if t], help="comma-separated tool names")
    parser.add_argument("--model", help="model name (server default if unset)")
    parser.add_argument("--system", help="system prompt (server default if unset)")
    parser.add_argument("--max-turns", type=int)
    parser.add_argument("--timeout", type=_seconds, default=300.0, help="deadline in seconds (above 0)")
    parser.add_argument("--no-color", action="store_true")
    parser.add_argument(
        "-i",
        "--interactive",
        action="store_true",
        help="talk to the run (Interact): answer approvals (y, n REASON, e JSON) and type corrections",
    )
    env = os.environ.get
    parser.add_argument("--ca-file", default=env("AGENT_TLS_CA"), help="CA of the server's certificate: use TLS")
    parser.add_argument("--cert-file", default=env("AGENT_TLS_CERT"), help="client certificate, for mutual TLS")
    parser.add_argument("--key-file", default=env("AGENT_TLS_KEY"), help="client certificate's key, for mutual TLS")
    parser.add_argument(
        "--token-file", default=env("AGENT_TOKEN_FILE"), help="file holding a bearer token (or env AGENT_TOKEN)"
    )
    args = parser.parse_args(argv)
    try:
        sys.exit(asyncio.run(run(args, sys.stdout)))
    except BrokenPipeError:
        # The reader left (`| head`): the run is cancelled with the call; stop without a traceback, and without
        # another one when Python flushes stdout on the way out.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: the call is cancelled with the client (its run too, unless CONTINUE)
        print("interrupted", file=sys.stderr)
        sys.exit(130)  # as a shell reports a process ended by SIGINT


if __name__ == "__main__":
    main()
