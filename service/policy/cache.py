"""A TTL cache of tool results, for idempotent tools only, keyed by tool name and the canonical JSON of the
validated input. In memory and bounded (least recently used entries go first); an injectable clock for tests."""

from __future__ import annotations

import json
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from tools.policy import CachePolicy


def cache_key(tool: str, args: Any) -> str:
    """`args` is the validated pydantic input: its JSON dump, keys sorted, is the same for equal inputs."""
    payload = args.model_dump(mode="json") if hasattr(args, "model_dump") else args
    return tool + "\0" + json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)


class ResultCache:
    def __init__(self, policy: CachePolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self.clock = clock
        self._entries: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> tuple[bool, Any]:
        """(hit, value): a tuple because None is a valid cached result."""
        entry = self._entries.get(key)
        if entry is None:
            return False, None
        expires, value = entry
        if self.clock() >= expires:
            del self._entries[key]
            return False, None
        self._entries.move_to_end(key)
        return True, value

    def put(self, key: str, value: Any) -> None:
        self._entries[key] = (self.clock() + self.policy.ttl_s, value)
        self._entries.move_to_end(key)
        while len(self._entries) > self.policy.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)
