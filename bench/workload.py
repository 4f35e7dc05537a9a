"""The workloads every system under test plays, defined once: the agent service gets them as a scripted-model
scenario and config file; the baselines replay the same event timeline (`timeline`) with the same sleeps."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import yaml

Kind = Literal["paced", "unpaced", "idle"]

TOOL_INPUT = {"note": "bench"}
IDLE_FIRST_TOKEN_S = 3600.0


@dataclass(frozen=True)
class Workload:
    """One run's shape: first event at once, the first token after `first_token_s`, `text_tokens` tokens
    `token_interval_s` apart, one tool call of `tool_latency_s`, then a short answer of `answer_tokens`."""

    kind: Kind = "paced"
    first_token_s: float = 0.100
    token_interval_s: float = 0.020
    text_tokens: int = 20
    answer_tokens: int = 5
    tool_latency_s: float = 0.100
    unpaced_events: int = 1000

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def unpaced(self, events: int | None = None) -> Workload:
        return replace(self, kind="unpaced", unpaced_events=events or self.unpaced_events)

    def idle(self) -> Workload:
        return replace(self, kind="idle")


SMOKE = Workload(first_token_s=0.020, token_interval_s=0.002, text_tokens=5, answer_tokens=2, tool_latency_s=0.010)


@dataclass(frozen=True, slots=True)
class Step:
    """Wait `delay_s`, then send one event of `kind`."""

    delay_s: float
    kind: str
    turn: int = 0
    text: str = ""


def json_pieces(value: dict[str, Any], parts: int = 3) -> list[str]:
    """The tool input cut as the scripted model cuts it (`service/models/scripted.py`)."""
    text = json.dumps(value)
    size = max(1, -(-len(text) // parts))
    return [text[i : i + size] for i in range(0, len(text), size)]


def _tokens(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i} " for i in range(n)]


def _turn(turn: int, words: list[str], w: Workload) -> list[Step]:
    return [
        Step(w.first_token_s if i == 0 else w.token_interval_s, "text_delta", turn, word)
        for i, word in enumerate(words)
    ]


def timeline(w: Workload) -> list[Step]:
    """The events one run sends, in order, with the wait before each: what the service's loop emits for the
    scenario `scenario(w)` (run_started, turn 1, usage, tool call, turn 2, usage, final_response)."""
    if w.kind == "unpaced":
        body = [Step(0.0, "text_delta", 1, word) for word in _tokens("w", w.unpaced_events - 3)]
        return [Step(0.0, "run_started"), *body, Step(0.0, "usage", 1), Step(0.0, "final_response", 1)]
    if w.kind == "idle":
        return [Step(0.0, "run_started"), Step(IDLE_FIRST_TOKEN_S, "text_delta", 1, "late ")]
    steps = [Step(0.0, "run_started"), *_turn(1, _tokens("t", w.text_tokens), w)]
    steps.append(Step(w.token_interval_s, "tool_call", 1))
    steps += [Step(w.token_interval_s, "tool_call_delta", 1, piece) for piece in json_pieces(TOOL_INPUT)]
    steps += [Step(0.0, "usage", 1), Step(0.0, "tool_call_ready", 1), Step(w.tool_latency_s, "tool_result", 1)]
    steps += _turn(2, _tokens("a", w.answer_tokens), w)
    steps += [Step(0.0, "usage", 2), Step(0.0, "final_response", 2)]
    return steps


def scenario(w: Workload) -> dict[str, Any]:
    """The scripted-model scenario that makes the service emit `timeline(w)`."""
    if w.kind == "unpaced":
        turns: list[dict[str, Any]] = [{"text": "".join(_tokens("w", w.unpaced_events - 3))}]
    elif w.kind == "idle":
        turns = [{"text": "late "}]
    else:
        turns = [
            {
                "text": "".join(_tokens("t", w.text_tokens)),
                "tool_calls": [{"name": "bench_sleep", "input": TOOL_INPUT}],
            },
            {"text": "".join(_tokens("a", w.answer_tokens))},
        ]
    return {"name": f"bench-{w.kind}", "turns": turns}


def pacing_ms(w: Workload) -> dict[str, float]:
    if w.kind == "unpaced":
        return {"first_token_ms": 0, "token_interval_ms": 0}
    first = IDLE_FIRST_TOKEN_S if w.kind == "idle" else w.first_token_s
    return {"first_token_ms": first * 1000, "token_interval_ms": w.token_interval_s * 1000}


def write_service_config(
    w: Workload,
    folder: Path,
    port: int,
    metrics_port: int,
    runs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Scenario and config files for `python -m service --config`; returns the config path. `runs` overrides the
    service's `runs:` section (e.g. coalescing off); `extra` sets other top-level sections (`state`, `workers`)."""
    folder.mkdir(parents=True, exist_ok=True)
    scenario_path = folder / f"scenario-{w.kind}.yaml"
    scenario_path.write_text(yaml.safe_dump(scenario(w), sort_keys=False))
    config = {
        "listen": f"127.0.0.1:{port}",
        "metrics_listen": f"127.0.0.1:{metrics_port}",
        "data_dir": str(folder / "var"),
        "shutdown_grace_s": 0,
        "model": {"provider": "scripted", "scenario": str(scenario_path), "pacing": pacing_ms(w)},
        "limits": {"tool_timeout_s": 120},
        "tools": {"bench_sleep": {"latency_ms": w.tool_latency_s * 1000}},
        "tool_modules": ["bench.bench_sleep"],
    }
    if runs:
        config["runs"] = runs
    config |= extra or {}
    path = folder / f"config-{w.kind}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def workload_arg(text: str) -> Workload:
    """A workload from its JSON form (how the orchestrator hands it to baseline processes)."""
    return Workload(**json.loads(text))
