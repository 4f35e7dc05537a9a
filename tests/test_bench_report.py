"""The benchmark's arithmetic on made-up rounds: medians over rounds, and ratios paired round by round so that a
noisy spell that slowed both systems in one round does not show as a difference between them."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("psutil", reason="bench extra not installed")

from bench import stats as report  # noqa: E402


def row(first_event_ms: float, errors: int = 0, censored: tuple[str, ...] = ()) -> dict[str, Any]:
    return {
        "streams": 100,
        "first_event_p99_ms": first_event_ms,
        "events_per_s": 1000.0,
        "errors": errors,
        "error_kinds": {"CANCELLED": errors} if errors else {},
        "censored": list(censored),
    }


def test_combine_takes_medians_adds_errors_and_keeps_the_rounds() -> None:
    rounds = [row(10.0), row(30.0, errors=2, censored=("total_p99",)), row(20.0, errors=1)]
    combined = report.combine(rounds)
    assert combined["first_event_p99_ms"] == 20.0 and combined["streams"] == 100
    assert combined["errors"] == 3 and combined["error_kinds"] == {"CANCELLED": 3}
    assert combined["censored"] == ["total_p99"]
    assert combined["rounds"] == rounds


def test_paired_ratio_is_the_median_of_per_round_ratios() -> None:
    # round 2 was slow for both systems: per round the service is 1.1x, 1.1x and 1.5x the bare server
    service = report.combine([row(11.0), row(110.0), row(15.0)])
    bare = report.combine([row(10.0), row(100.0), row(10.0)])
    assert report.paired_ratio(service, bare, "first_event_p99_ms") == pytest.approx(1.1)
    # the ratio of the medians would have said 15/10
    assert service["first_event_p99_ms"] / bare["first_event_p99_ms"] == pytest.approx(1.5)
    assert report.ratio_spread(service, bare, "first_event_p99_ms") == "1.10–1.50"


def test_paired_ratio_falls_back_to_the_medians_when_rounds_do_not_pair() -> None:
    service = report.combine([row(12.0), row(14.0)])
    naive = report.combine([row(100.0)])
    assert report.paired_ratio(service, naive, "first_event_p99_ms") == pytest.approx(0.13)
    assert report.ratio_spread(service, naive, "first_event_p99_ms") == ""
    assert report.paired_ratio(None, naive, "first_event_p99_ms") is None


def test_rounds_grow_where_a_round_is_short_and_one_noisy_round_would_decide() -> None:
    from bench.plan import PLANS

    plan = PLANS["full"]
    assert [plan.rounds_at(c) for c in (1, 100, 1000, 5000)] == [9, 9, 5, 3]
    assert {PLANS["smoke"].rounds_at(c) for c in PLANS["smoke"].levels} == {PLANS["smoke"].rounds}


def test_paired_ratio_leaves_out_rounds_whose_load_generator_was_saturated() -> None:
    # round 2's load generator was saturated: it measured itself and read both systems alike (1.0x)
    service = report.combine([row(15.0), {**row(100.0), "saturated": True}, row(14.0)])
    bare = report.combine([row(10.0), row(100.0), row(10.0)])
    assert service["saturated_rounds"] == 1
    assert report.paired_ratio(service, bare, "first_event_p99_ms") == pytest.approx(1.45)
    assert report.ratio_spread(service, bare, "first_event_p99_ms") == "1.40–1.50"
    assert report.ratio_cell(service, bare, "first_event_p99_ms") == "1.45 (1.40–1.50), 1/3 rounds saturated, left out"
    # every round saturated: no ratio, and the table says why
    both = report.combine([{**row(10.0), "saturated": True}, {**row(20.0), "saturated": True}])
    other = report.combine([row(10.0), row(10.0)])
    assert report.paired_ratio(both, other, "first_event_p99_ms") is None
    assert report.ratio_cell(both, other, "first_event_p99_ms") == "saturated (2/2 rounds)"
    # unpaired rows (the naive pattern's one round) fall back to the medians of the unsaturated rounds
    single = report.combine([{**row(50.0), "saturated": True}])
    assert report.paired_ratio(other, single, "first_event_p99_ms") is None


# h2load 1.52's summary of a gRPC run against the bare server, as `bench.h2load.run` reads it
H2LOAD_OUTPUT = """starting benchmark...
spawning thread #0: 10 total client(s). 10 total requests
Application protocol: h2c
progress: 100% done

finished in 1.02s, 9.85 req/s, 26.41KB/s
requests: 10 total, 10 started, 10 done, 9 succeeded, 1 failed, 1 errored, 0 timeout
status codes: 10 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 26.82KB (27460) total, 780B (780) headers (space savings 3.70%), 21.68KB (22200) data
                     min         max         mean         sd        +/- sd
time for request:   999.56ms       1.01s       1.01s      2.24ms    80.00%
time for connect:      277us      1.26ms       646us       290us    80.00%
time to 1st byte:     4.45ms      9.62ms      7.27ms      1.58ms    70.00%
req/s           :       0.99        1.00        0.99        0.00    80.00%
"""


def test_h2load_output_is_parsed_into_seconds_counts_and_bytes() -> None:
    from bench import h2load

    out = h2load.parse(H2LOAD_OUTPUT)
    assert out["finished_s"] == pytest.approx(1.02) and out["req_per_s"] == pytest.approx(9.85)
    assert out["requests"] == {
        "total": 10,
        "started": 10,
        "done": 10,
        "succeeded": 9,
        "failed": 1,
        "errored": 1,
        "timeout": 0,
    }
    assert out["data_bytes"] == 22200
    assert out["ttfb"] == pytest.approx({"min": 0.00445, "max": 0.00962, "mean": 0.00727, "sd": 0.00158})
    assert out["request"]["max"] == pytest.approx(1.01) and out["connect"]["min"] == pytest.approx(277e-6)
    with pytest.raises(ValueError, match="ttfb"):
        h2load.parse(H2LOAD_OUTPUT.replace("time to 1st byte", "time to first"))


def test_h2load_request_is_one_grpc_frame_and_loads_spread_streams() -> None:
    from bench import h2load
    from bench.h2load import Load

    message = h2load.REQUEST.SerializeToString()
    assert h2load.grpc_frame(message) == b"\x00" + len(message).to_bytes(4, "big") + message
    assert Load.spread(1000, 1) == Load(1000, 1000, 1)  # time to first byte: a connection per stream
    assert Load.spread(1000, 100) == Load(1000, 10, 100)
    assert Load.spread(5, 100) == Load(5, 1, 5)
    assert Load.spread(1000, 100, "sse") == Load(1000, 1000, 1)  # HTTP/1.1 would pipeline


def test_validation_names_what_a_stream_lacks() -> None:
    from bench import h2load
    from bench.workload import SMOKE, timeline

    good = [(s.kind, s.text) for s in timeline(SMOKE)]
    assert h2load.check(good, SMOKE, exact=True) == []
    # coalesced text deltas: the same text in fewer events passes unless the count must be exact
    others = [e for e in good if e[0] != "text_delta"]
    merged = [others[0], ("text_delta", "".join(t for k, t in good if k == "text_delta")), *others[1:]]
    assert h2load.check(merged, SMOKE, exact=False) == []
    assert "events where the workload sends" in h2load.check(merged, SMOKE, exact=True)[0]
    # a stream cut before its end (an error after some events) fails however it is counted
    problems = h2load.check(good[:-1], SMOKE, exact=False)
    assert problems and "final_response" in problems[0]


def test_without_h2load_its_stage_says_how_to_get_it_and_its_targets_are_not_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from bench import h2bench, h2report
    from bench.plan import PLANS

    monkeypatch.setenv("PATH", str(tmp_path))  # no h2load there
    results = {"h2load": h2bench.stage(PLANS["smoke"], tmp_path)}
    assert "nghttp2-client" in results["h2load"]["skipped"]
    assert "**Not run.**" in "\n".join(h2report.markdown(results))
    assert {t["pass"] for t in h2report.targets(results)} == {None}


def test_targets_hold_the_performance_issues_thresholds() -> None:
    """Tool-call overhead under 50 µs and at most 40 KiB per idle stream (issue 15), not the older 100 µs / 50 KiB:
    a run at 60 µs and 45 KiB misses both."""
    from bench.report import targets

    results: dict[str, Any] = {
        "levels": [100],
        "paced": {},
        "unpaced": {},
        "overhead": {"stacks": {"executor": {"overhead_p50_us": 60.0}}},
        "idle": {"service": {"per_stream_bytes": 45 * 1024, "streams": 5000}},
    }
    rows = {row["target"].split(" (")[0]: row for row in targets(results)}
    assert rows["tool-call overhead < 50 µs p50"]["pass"] is False
    assert rows["≤ 40 KiB per idle open stream"]["pass"] is False
    results["overhead"]["stacks"]["executor"]["overhead_p50_us"] = 40.0
    results["idle"]["service"]["per_stream_bytes"] = 36 * 1024
    rows = {row["target"].split(" (")[0]: row for row in targets(results)}
    assert rows["tool-call overhead < 50 µs p50"]["pass"] and rows["≤ 40 KiB per idle open stream"]["pass"]


def test_the_workers_target_against_sse_leaves_out_rounds_with_failed_streams_or_saturation() -> None:
    """Issue 15: the service with --workers 2 clearly better than FastAPI SSE at C = 1000 (`bench.workers_sse`)."""
    from bench import h2report
    from bench.workers_sse import SERVICE, SSE, goals

    def row(*values: tuple[float, float], failed: tuple[int, ...] = (), saturated: tuple[int, ...] = ()) -> Any:
        keys = ("ttfb_mean_ms", "ttfb_max_ms")
        return {
            "rounds": [
                dict(zip(keys, v, strict=True), failed=i in failed, saturated=i in saturated)
                for i, v in enumerate(values)
            ]
        }

    # round 2: the service refused calls (they end at once, 0.1x), round 3: h2load saturated; both leave the ratios
    service = row((70, 90), (70, 90), (10, 10), (10, 10), failed=(2,))
    sse = row((100, 100), (100, 100), (100, 100), (100, 100), saturated=(3,))
    measured = goals(service, sse)
    assert measured["mean"]["ratios"] == pytest.approx([0.7, 0.7]) and measured["mean"]["left_out"] == 2
    results = {
        "h2load": {"workers_sse": {"levels": [1000], "rows": {SERVICE: [], SSE: []}, "goals": {"1000": measured}}}
    }
    rows = {t["target"]: t for t in h2report.targets(results)}
    assert rows["h2load time to first byte, mean ≤ 0.8× FastAPI SSE's, --workers 2 (C=1000)"]["pass"] is True
    assert rows["h2load time to first byte, max ≤ 0.8× FastAPI SSE's, --workers 2 (C=1000)"]["pass"] is False
    # not run (no Redis, no h2load): the target says so rather than passing
    skipped = {"h2load": {"workers_sse": {"skipped": "Redis does not answer"}}}
    assert [t["pass"] for t in h2report.targets(skipped) if "--workers 2" in t["target"]] == [None, None]
