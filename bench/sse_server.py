"""The alternatives: a FastAPI/uvicorn SSE endpoint replaying the same timeline, either from an async generator
(`--mode async`, the usual way) or by iterating a synchronous agent generator that blocks on each model and tool
call inside the async endpoint (`--mode sync`, the naive pattern). `python -m bench.sse_server --port P ...`."""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import PlainTextResponse, StreamingResponse

from bench.workload import Step, timeline, workload_arg


def _sse(run_id: str, seq: int, step: Step) -> str:
    data = {"run_id": run_id, "seq": seq, "time_ns": time.time_ns(), "kind": step.kind, "turn": step.turn}
    if step.text:
        data["text"] = step.text
    return f"event: {step.kind}\ndata: {json.dumps(data)}\n\n"


def sync_agent(steps: list[Step]) -> Iterator[Step]:
    """An agent written as a plain generator: each model token and tool call is a blocking call."""
    for step in steps:
        if step.delay_s:
            time.sleep(step.delay_s)
        yield step


def build_app(steps: list[Step], mode: str) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/run")
    async def run(message: str = "hello") -> StreamingResponse:
        run_id = f"run_{uuid.uuid4().hex[:24]}"

        async def paced() -> AsyncIterator[str]:
            for seq, step in enumerate(steps, start=1):
                if step.delay_s:
                    await asyncio.sleep(step.delay_s)
                yield _sse(run_id, seq, step)

        async def naive() -> AsyncIterator[str]:
            for seq, step in enumerate(sync_agent(steps), start=1):
                yield _sse(run_id, seq, step)

        body = paced() if mode == "async" else naive()
        return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["async", "sync"], required=True)
    parser.add_argument("--workload", type=workload_arg, required=True)
    args = parser.parse_args()
    app = build_app(timeline(args.workload), args.mode)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False, backlog=8192)


if __name__ == "__main__":
    main()
