"""The chaos harness's checks (`bench/chaos/checks.py`) on made-up rounds: each violation it exists to catch is
caught, and the deliveries the contract allows (merged deltas, a turn cut off and requested again) are not flagged."""

from __future__ import annotations

from typing import Any

from agent.v1 import agent_pb2 as pb
from bench.chaos.checks import RunLog, check
from bench.chaos.clients import Seen
from bench.chaos.effects import Effect, Effects
from bench.chaos.model import ChaosModel

RUN = "run_1"
KEY = f"{RUN}:toolu_1"


def event(seq: int, first_seq: int = 0, **payload: Any) -> pb.AgentEvent:
    return pb.AgentEvent(run_id=RUN, seq=seq, first_seq=first_seq, **payload)


def clean_log(status: int = pb.TOOL_STATUS_OK) -> list[pb.AgentEvent]:
    return [
        event(1, run_started=pb.RunStarted(model="m")),
        event(2, text_delta=pb.TextDelta(turn=1, text="a")),
        event(3, text_delta=pb.TextDelta(turn=1, text="b")),
        event(4, tool_call=pb.ToolCall(turn=1, call_id="toolu_1", name="http_request")),
        event(5, tool_result=pb.ToolResult(call_id="toolu_1", name="http_request", status=status)),
        event(6, final_response=pb.FinalResponse(text="done")),
    ]


def round_of(
    logs: dict[str, list[pb.AgentEvent]], effect: Effect | None = None, model: ChaosModel | None = None
) -> list[str]:
    seen = Seen("c0", "stream", run_id=RUN, received=list(range(1, 7)), end="final_response")
    run = RunLog(seen, state=pb.Run.SUCCEEDED, last_seq=6, logs=logs)
    effects = Effects()
    effects.by_key[KEY] = effect or Effect("unsafe", executions=1)
    report = check([run], model or ChaosModel("http://effects"), effects, kills=[])
    return sorted(report.by_kind)


def test_a_clean_round_has_no_violation() -> None:
    assert round_of({"r0": clean_log(), "r1": clean_log()}) == []


def test_merged_deltas_in_a_replay_are_the_same_log() -> None:
    merged = clean_log()
    merged[1:3] = [event(3, first_seq=2, text_delta=pb.TextDelta(turn=1, text="ab"))]
    assert round_of({"r0": clean_log(), "r1": merged}) == []


def test_a_gap_and_a_different_log_are_caught() -> None:
    gapped = [e for e in clean_log() if e.seq != 3]
    assert round_of({"r0": clean_log(), "r1": gapped}) == ["log_differs", "log_gap"]


def test_an_unsafe_call_run_twice_is_caught() -> None:
    assert round_of({"r0": clean_log()}, Effect("unsafe", executions=2)) == ["unsafe_repeat"]


def test_an_unsafe_call_cut_off_must_be_reported_unknown() -> None:
    cut = Effect("unsafe", executions=1, interrupted=1)
    assert round_of({"r0": clean_log()}, cut) == ["unsafe_unreported"]
    assert round_of({"r0": clean_log(pb.TOOL_STATUS_OUTCOME_UNKNOWN)}, cut) == []


def test_a_call_that_reached_the_upstream_needs_a_result_in_the_log() -> None:
    without = [e for e in clean_log() if not e.HasField("tool_result")]
    assert round_of({"r0": without}) == ["log_gap", "unlogged_result"]


def request(*assistant_texts: str) -> dict[str, Any]:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "chaos:c0 go"}]
    for text in assistant_texts:
        messages += [
            {"role": "assistant", "content": [{"type": "text", "text": text}]},
            {"role": "user", "content": []},
        ]
    return {"messages": messages}


def test_a_turn_requested_after_its_recorded_attempt_is_caught() -> None:
    allowed = ChaosModel("http://effects")
    allowed._reply(request())  # turn 1, attempt 1: cut off by a crash
    allowed._reply(request())  # turn 1, attempt 2: recorded
    allowed._reply(request("c0 turn 1 attempt 2: …"))
    assert round_of({"r0": clean_log()}, model=allowed) == []

    repeated = ChaosModel("http://effects")
    repeated._reply(request())  # turn 1, attempt 1: recorded
    repeated._reply(request())  # turn 1 again, after it was recorded
    repeated._reply(request("c0 turn 1 attempt 1: …"))
    assert round_of({"r0": clean_log()}, model=repeated) == ["model_repeat"]


def test_a_seq_the_caller_was_sent_may_not_name_another_event_later() -> None:
    seen = Seen("c0", "stream", run_id=RUN, received=[1, 2], end="final_response", events=clean_log()[:2])
    rewritten = clean_log()
    rewritten[1] = event(2, text_delta=pb.TextDelta(turn=1, text="other"))
    effects = Effects()
    effects.by_key[KEY] = Effect("unsafe", executions=1)
    for log, kinds in ((clean_log(), []), (rewritten, ["seq_rewound"])):
        run = RunLog(seen, state=pb.Run.SUCCEEDED, last_seq=6, logs={"r0": log})
        report = check([run], ChaosModel("http://effects"), effects, kills=[])
        assert sorted(report.by_kind) == kinds
