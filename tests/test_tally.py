"""Per-call counters kept as ints and passed to Prometheus at each scrape (service/tally.py): a scrape sees every
count added before it, and a count is passed on once."""

from __future__ import annotations

import asyncio
import threading

import pytest
from prometheus_client import REGISTRY, Counter, Gauge, Histogram

from service import tally

CALLS = Counter("test_tally_calls_total", "a tallied counter", ["outcome"])
OPEN = Gauge("test_tally_open", "a tallied gauge")


def test_a_scrape_sees_every_count_added_before_it_and_each_once() -> None:
    ok, failed = (CALLS, "OK"), (CALLS, "FAILED")
    before = REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "OK"}) or 0.0
    for _ in range(3):
        tally.add(ok)
    tally.add(failed, 2)
    assert CALLS.labels("OK")._value.get() == before  # no lock taken per call: not passed on yet
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "OK"}) == before + 3
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "OK"}) == before + 3  # once, not twice
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "FAILED"}) == 2
    tally.add(ok)
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "OK"}) == before + 4


def test_a_counted_dict_is_passed_on_at_a_scrape_and_each_count_once() -> None:
    counts = tally.counted({"done": (CALLS, "COUNTED")})
    assert counts == {"done": 0}
    counts["done"] += 2
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "COUNTED"}) == 2
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "COUNTED"}) == 2  # once, not twice
    counts["done"] += 1
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "COUNTED"}) == 3


def test_a_gauge_goes_up_and_down_and_shows_the_net_at_a_scrape() -> None:
    start = REGISTRY.get_sample_value("test_tally_open")
    tally.add((OPEN,), 1)
    tally.add((OPEN,), 1)
    assert REGISTRY.get_sample_value("test_tally_open") == start + 2
    tally.add((OPEN,), -1)
    tally.add((OPEN,), -1)
    assert REGISTRY.get_sample_value("test_tally_open") == start


def test_scrapes_on_other_threads_while_counts_are_added_lose_nothing() -> None:
    key = (CALLS, "RACED")
    before = REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "RACED"}) or 0.0
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            tally.flush()

    scrapers = [threading.Thread(target=scrape) for _ in range(2)]
    for thread in scrapers:
        thread.start()
    for _ in range(20_000):
        tally.add(key)
    stop.set()
    for thread in scrapers:
        thread.join()
    assert REGISTRY.get_sample_value("test_tally_calls_total", {"outcome": "RACED"}) == before + 20_000


TIMES = Histogram("test_tally_seconds", "a tallied histogram", buckets=(0.001, 0.01, 0.1, 1))
SAME = Histogram("test_tally_reference_seconds", "the same, observed as usual", buckets=(0.001, 0.01, 0.1, 1))


def samples(name: str) -> dict[str, float]:
    family = next(f for f in REGISTRY.collect() if f.name == name)
    return {s.labels.get("le", s.name.removeprefix(name)): s.value for s in family.samples if "created" not in s.name}


def test_a_tallied_histogram_scrapes_as_prometheus_client_would_observe_it() -> None:
    tallied = tally.histogram(TIMES)
    amounts = [0.0, 0.0005, 0.001, 0.002, 0.01, 0.5, 1.0, 7.0, 0.001]  # on a bound: counted in that bucket (le)
    for amount in amounts[:4]:
        tallied.observe(amount)
        SAME.observe(amount)
    assert TIMES._sum.get() == 0  # no lock taken per observation: not passed on yet
    assert samples("test_tally_seconds") == samples("test_tally_reference_seconds")
    for amount in amounts[4:]:
        tallied.observe(amount)
        SAME.observe(amount)
    scraped = samples("test_tally_seconds")
    assert scraped == samples("test_tally_reference_seconds")
    assert scraped["_count"] == len(amounts) and scraped["+Inf"] == len(amounts)
    assert samples("test_tally_seconds") == scraped  # each observation passed on once


async def test_under_workers_what_was_counted_is_written_every_period(monkeypatch: pytest.MonkeyPatch) -> None:
    flushed = asyncio.Event()
    monkeypatch.setattr(tally, "flush", flushed.set)
    keeper = asyncio.create_task(tally.keep_observed(0.01))
    try:
        await asyncio.wait_for(flushed.wait(), 5)
    finally:
        keeper.cancel()
