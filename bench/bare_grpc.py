"""The limit: a bare `grpc.aio` server that streams the same `AgentEvent` messages with the same pacing as the
service and no agent machinery. `python -m bench.bare_grpc --port P --workload JSON [--start-cpu-us N]`.

`--start-cpu-us N` makes each call first spend N µs of CPU, as a heavier start would: the start-budget stage of
the benchmark (`bench.run.start_budget`) uses it to learn what a given start cost does to the first-event ratio."""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from google.protobuf import timestamp_pb2

from agent.v1 import agent_pb2 as pb
from agent.v1 import agent_pb2_grpc
from bench.serving import serve_until_stopped
from bench.workload import Step, timeline, workload_arg
from service.config import Limits
from service.rpc.accept import AcceptAhead
from service.rpc.server import SERVICE_NAME, pending_rpc_options

_PAYLOADS = {
    "run_started": lambda s: {"run_started": pb.RunStarted(model="bare", tools=["bench_sleep"], max_turns=10)},
    "text_delta": lambda s: {"text_delta": pb.TextDelta(turn=s.turn, text=s.text)},
    "tool_call": lambda s: {"tool_call": pb.ToolCall(turn=s.turn, call_id="toolu_bare", name="bench_sleep")},
    "tool_call_delta": lambda s: {"tool_call_delta": pb.ToolCallDelta(call_id="toolu_bare", partial_json=s.text)},
    "tool_call_ready": lambda s: {"tool_call_ready": pb.ToolCallReady(call_id="toolu_bare", name="bench_sleep")},
    "tool_result": lambda s: {
        "tool_result": pb.ToolResult(call_id="toolu_bare", name="bench_sleep", status=pb.TOOL_STATUS_OK)
    },
    "usage": lambda s: {"usage": pb.Usage(turn=s.turn, input_tokens=10, output_tokens=20)},
    "final_response": lambda s: {"final_response": pb.FinalResponse(text="done", stop_reason="end_turn")},
}


def _event(run_id: str, seq: int, step: Step) -> pb.AgentEvent:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(time.time_ns())
    return pb.AgentEvent(run_id=run_id, seq=seq, time=ts, **_PAYLOADS[step.kind](step))


def spend_cpu(seconds: float) -> None:
    """Busy for `seconds` of this thread's CPU time (not wall time: a preempted thread keeps spending)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class BareServicer(agent_pb2_grpc.AgentServiceServicer):  # type: ignore[misc]
    def __init__(self, steps: list[Step], start_cpu_s: float = 0.0) -> None:
        self.steps = steps
        self.start_cpu_s = start_cpu_s

    async def RunAgent(
        self, request: pb.RunAgentRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.AgentEvent]:
        if self.start_cpu_s:
            spend_cpu(self.start_cpu_s)
        run_id = f"run_{uuid.uuid4().hex[:24]}"
        for seq, step in enumerate(self.steps, start=1):
            if step.delay_s:
                await asyncio.sleep(step.delay_s)
            yield _event(run_id, seq, step)


async def serve(port: int, steps: list[Step], start_cpu_s: float = 0.0, accept_ahead: int = 0) -> None:
    # the service's queue for calls not yet taken up (`pending_rpc_options`) and how many it takes up at a time
    # (`AcceptAhead`): transport configuration, not agent machinery
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *pending_rpc_options(Limits())])
    accept = AcceptAhead(server, accept_ahead, (SERVICE_NAME,))
    agent_pb2_grpc.add_AgentServiceServicer_to_server(BareServicer(steps, start_cpu_s), accept)
    await serve_until_stopped(server, port, accept.start)
    await accept.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workload", type=workload_arg, required=True)
    parser.add_argument("--start-cpu-us", type=float, default=0.0, help="CPU µs each call spends before its stream")
    parser.add_argument(
        "--accept-ahead", type=int, default=Limits().accept_ahead, help="as the service's limits.accept_ahead"
    )
    args = parser.parse_args()
    asyncio.run(serve(args.port, timeline(args.workload), args.start_cpu_us / 1e6, args.accept_ahead))


if __name__ == "__main__":
    main()
