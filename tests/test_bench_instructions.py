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


def test_a_live_dump_is_read_by_its_thread_and_its_totals(tmp_path: Path) -> None:
    """The live count's per-thread dumps (`--separate-threads=yes`): the thread from the `thread:` line, the count
    from `totals:`, not from the header's `summary:`, which callgrind writes as 0 in a dump of a running process."""
    from bench.instructions import _thread_totals

    dump = tmp_path / "callgrind.out.1-03"
    dump.write_text(
        "# callgrind format\nversion: 1\npart: 1\nthread: 3\n\nevents: Ir\nsummary: 0\n\nfn=(1) main\n1 5\n"
        "\ntotals: 129361716\n"
    )
    assert _thread_totals(dump) == (3, 129361716)
    named = tmp_path / "callgrind.out.2-01"  # no `thread:` line: the name's suffix tells
    named.write_text("events: Ir\ntotals: 7\n")
    assert _thread_totals(named) == (1, 7)
