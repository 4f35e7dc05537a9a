"""`bench.liveprof` counts what it says: the live server's Python-level calls per gRPC call on its main thread, so
that the service's per-call work can be compared with the bare server's function by function."""

from __future__ import annotations

import shutil

import pytest

from bench import liveprof

pytestmark = pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")


def test_the_service_is_profiled_call_by_call_beside_the_bare_server() -> None:
    bare = liveprof.measure("bare", calls=200, in_flight=20, top=200)
    service = liveprof.measure("service", calls=200, in_flight=20, top=200)
    for figures in (bare, service):
        assert figures["loop_passes_per_call"] > 1  # the event loop was profiled, over the counted calls only
        assert figures["python_calls_per_call"] > 50
    # each counted call went through the service's stream handler once (its first step and its four events)
    stream = next(n for name, n in service["functions_per_call"].items() if name.startswith("runstream.py"))
    assert 4.5 <= stream <= 5.5
    assert not any(name.startswith("runstream.py") for name in bare["functions_per_call"])
    assert service["python_calls_per_call"] > bare["python_calls_per_call"]
