"""The composition root stays one file a reader can follow (STYLE.md: files under ~400 lines): parts it builds that
are not wiring (the stores' health report, in service/rpc/store_health.py) live beside the parts they serve."""

from __future__ import annotations

from pathlib import Path

import service.wiring


def test_the_composition_root_is_under_400_lines() -> None:
    lines = len(Path(service.wiring.__file__).read_text(encoding="utf-8").splitlines())
    assert lines < 400, f"service/wiring.py has {lines} lines: move a part that is not wiring out of it"
