"""`bench.instructions` measures what it says: its inner driver plays whole calls of the asked number of events
through the service's servicer and through the bare one (without valgrind here: the count itself is callgrind's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("system", ["service", "bare"])
def test_inner_driver_plays_whole_calls(system: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "AGENT_INSTR_INNER"}  # no callgrind to switch on
    done = subprocess.run(
        [sys.executable, "-m", "bench.instructions", "--inner", system, "7", "6", "4"],
        cwd=ROOT,
        env=env | {"GRPC_VERBOSITY": "ERROR"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # the driver asserts every call yielded exactly 7 events; a short or failed call exits non-zero
    assert done.returncode == 0, done.stderr[-2000:]
