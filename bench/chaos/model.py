"""The chaos harness's model: the tests' fake Anthropic Messages server (`tests/fake_anthropic.py`, the real SSE
wire protocol) answering every run of the harness at once, with a reply computed from the conversation rather than
scripted in order.

Each run's first user message names it (`chaos:<label>`); the turn is one more than the assistant messages the
request carries. Every reply's text says which attempt at that turn it is (`turn 2 attempt 1`), so that the history
the service sends with the next turn tells which attempt the run recorded. A turn requested again after its
recorded attempt (a higher attempt number) is a model request after a recorded turn: what durability forbids.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from tests.fake_anthropic import FakeAnthropic, Text, ToolUse

LABEL = re.compile(r"chaos:(\w+)")
MARK = re.compile(r"turn (\d+) attempt (\d+)")
FILLER = " ".join(f"word{i}" for i in range(24))


@dataclass
class Turns:
    """What the model saw of one run."""

    attempts: dict[int, int] = field(default_factory=lambda: defaultdict(int))  # turn -> requests for it
    # turn -> the attempts at it that later requests carried in their history (one, unless the run forked)
    recorded: dict[int, set[int]] = field(default_factory=lambda: defaultdict(set))
    request_times: list[tuple[int, int, float]] = field(default_factory=list)  # (turn, attempt, wall time)


class ChaosModel:
    """`turns` model turns per run: each but the last streams some text and calls `http_request` twice against
    the effect counter at `effects_url`, a GET (safe to repeat) and a POST (not); the last answers. `delay`: seconds
    between two streamed events, so that a kill lands mid-turn."""

    def __init__(self, effects_url: str, *, turns: int = 3, delay: float = 0.02) -> None:
        self.effects_url = effects_url
        self.turns = turns
        self.delay = delay
        self.runs: dict[str, Turns] = defaultdict(Turns)
        self.unknown_requests = 0  # requests naming no chaos run: a bug of the harness
        self.fake = FakeAnthropic(on_request=self._reply)

    async def start(self) -> str:
        await self.fake.start()
        return self.fake.base_url

    async def stop(self) -> None:
        await self.fake.stop()

    def _reply(self, body: dict[str, Any]) -> None:
        messages = body.get("messages", [])
        label = LABEL.search(_text(messages[0])) if messages else None
        if label is None:
            self.unknown_requests += 1
            self.fake.script_turn(text="not a chaos run")
            return
        run = self.runs[label.group(1)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        for m in assistant:  # the attempts the run's history says it kept
            if mark := MARK.search(_text(m)):
                run.recorded[int(mark.group(1))].add(int(mark.group(2)))
        turn = len(assistant) + 1
        run.attempts[turn] += 1
        attempt = run.attempts[turn]
        run.request_times.append((turn, attempt, time.time()))
        text = f"{label.group(1)} turn {turn} attempt {attempt}: {FILLER}"
        if turn >= self.turns:
            self.fake.script_blocks([Text(text, pieces=8)], delay=self.delay)
            return
        base = f"{self.effects_url}/{label.group(1)}/{turn}"
        calls = [
            ToolUse("http_request", {"method": "GET", "url": f"{base}/safe"}, pieces=2),
            ToolUse("http_request", {"method": "POST", "url": f"{base}/unsafe", "json_body": {"turn": turn}}, pieces=2),
        ]
        self.fake.script_blocks([Text(text, pieces=8), *calls], delay=self.delay)

    def final_attempt(self, label: str, final_text: str) -> int | None:
        """The attempt at the last turn a run answered with (from its final response's text)."""
        mark = MARK.search(final_text)
        return int(mark.group(2)) if mark and int(mark.group(1)) == self.turns else None


def _text(message: dict[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    return " ".join(str(block.get("text", "")) for block in content if isinstance(block, dict))
