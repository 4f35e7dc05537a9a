"""`bench.overhead --instructions` counts what it says: its inner driver makes the asked number of calls, each of
which works (without valgrind here: the count itself is callgrind's)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("stack", ["direct", "executor"])
def test_inner_driver_makes_calls_that_work(stack: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "BENCH_OVERHEAD_CALLGRIND"}  # no callgrind to switch on
    done = subprocess.run(
        [sys.executable, "-m", "bench.overhead", "--inner", stack, "30"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]  # the driver asserts that the last counted call worked
