"""The A2A SDK baseline (`bench/a2a_baseline.py`, run from `.a2a-venv`): its server plays the workload's timeline
and the benchmark's validation reads every step back from it, as it does for the other systems."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from bench import h2load
from bench.procs import start
from bench.workload import SMOKE, timeline

pytestmark = pytest.mark.skipif(not h2load.a2a_available(), reason="no .a2a-venv: `make a2a-venv` builds it")


def test_a2a_server_plays_the_timeline_and_validates(tmp_path: Path) -> None:
    body = h2load.request_file(tmp_path)
    h2load.a2a_request_file(tmp_path)
    server = start("a2a", SMOKE, tmp_path)
    try:
        got = h2load.validate(server, body, SMOKE, exact=True, deadline=30)
        assert got["status"] == "OK"
        assert got["events"] == len(timeline(SMOKE))
        if path := shutil.which("h2load"):
            out = h2load.run(path, server, body, h2load.Load(4, 2, 2), deadline=30)
            assert out["requests"]["succeeded"] == 4
            # the same events: only their timestamps' varints may differ a byte or two in length
            assert out["data_bytes"] == pytest.approx(4 * got["body_bytes"], rel=0.01)
    finally:
        server.stop()


def test_a_wrong_timeline_fails_validation(tmp_path: Path) -> None:
    body = h2load.request_file(tmp_path)
    h2load.a2a_request_file(tmp_path)
    server = start("a2a", SMOKE, tmp_path)
    try:
        with pytest.raises(RuntimeError, match="the validating stream is wrong"):
            h2load.validate(server, body, SMOKE.unpaced(7), exact=True, deadline=30)
    finally:
        server.stop()
