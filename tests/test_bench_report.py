"""The benchmark's arithmetic on made-up rounds: medians over rounds, and ratios paired round by round so that a
noisy spell that slowed both systems in one round does not show as a difference between them."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("psutil", reason="bench extra not installed")

from bench import report  # noqa: E402


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
    from bench.run import PLANS

    plan = PLANS["full"]
    assert [plan.rounds_at(c) for c in (1, 100, 1000, 5000)] == [9, 9, 5, 3]
    assert {PLANS["smoke"].rounds_at(c) for c in PLANS["smoke"].levels} == {PLANS["smoke"].rounds}
