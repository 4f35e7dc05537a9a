"""The benchmark's arithmetic: percentiles, one row from several rounds, and ratios paired round by round, leaving
out rounds in which the load generator was saturated."""

from __future__ import annotations

import math
import statistics
from typing import Any


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; `inf` stands for a stream that never got there (cut at the deadline)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def combine(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One row for several rounds of the same level: the median of each figure, errors added up, a figure censored
    in any round censored, and the rounds themselves under "rounds" (for per-round ratios)."""
    if len(rounds) == 1:
        return {**rounds[0], "rounds": rounds, "saturated_rounds": int(bool(rounds[0].get("saturated")))}
    row: dict[str, Any] = {}
    for key, value in rounds[0].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            row[key] = statistics.median(r[key] for r in rounds)
    kinds: dict[str, int] = {}
    for r in rounds:
        for kind, n in r["error_kinds"].items():
            kinds[kind] = kinds.get(kind, 0) + n
    row.update(
        streams=rounds[0]["streams"],
        errors=sum(r["errors"] for r in rounds),
        error_kinds=kinds,
        censored=sorted({c for r in rounds for c in r["censored"]}),
        rounds=rounds,
        saturated_rounds=sum(1 for r in rounds if r.get("saturated")),
    )
    return row


def _unsaturated(row: dict[str, Any]) -> list[dict[str, Any]]:
    return [r for r in row.get("rounds", [row]) if not r.get("saturated")]


def _pairs(a: dict[str, Any], b: dict[str, Any], key: str) -> list[tuple[float, float]] | None:
    """The figures of rounds that ran side by side, leaving out a pair when either load generator was saturated;
    None when the rounds do not pair (one side ran a different number of rounds)."""
    ra, rb = a.get("rounds", []), b.get("rounds", [])
    if len(ra) < 2 or len(ra) != len(rb) or not all(r[key] for r in rb):
        return None
    return [(x[key], y[key]) for x, y in zip(ra, rb, strict=True) if not (x.get("saturated") or y.get("saturated"))]


def paired_ratio(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> float | None:
    """a's figure over b's: the median of the per-round ratios when both ran the same rounds side by side (a noisy
    spell then cancels out), else the ratio of the medians. Rounds whose load generator was saturated are left
    out; None when none is left."""
    if a is None or b is None:
        return None
    pairs = _pairs(a, b, key)
    if pairs is not None:
        return float(statistics.median(x / y for x, y in pairs)) if pairs else None
    ua, ub = _unsaturated(a), _unsaturated(b)
    if not ua or not ub:
        return None
    return ratio(statistics.median(r[key] for r in ua), statistics.median(r[key] for r in ub))


def ratio_spread(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str) -> str:
    """The lowest and highest per-round ratio of the unsaturated pairs, e.g. "1.10–1.32"; empty for one round."""
    if a is None or b is None:
        return ""
    pairs = _pairs(a, b, key)
    if not pairs or len(pairs) < 2:
        return ""
    values = [x / y for x, y in pairs]
    return f"{min(values):.2f}–{max(values):.2f}"


def saturated(a: dict[str, Any] | None, b: dict[str, Any] | None = None) -> tuple[int, int]:
    """How many of the rounds behind a (and b, paired) had a saturated load generator, and how many rounds."""
    ra = a.get("rounds", [a]) if a else []
    rb = b.get("rounds", [b]) if b else [{}] * len(ra)
    if len(rb) != len(ra):
        rb = [{}] * len(ra)
    flagged = sum(1 for x, y in zip(ra, rb, strict=True) if x.get("saturated") or y.get("saturated"))
    return flagged, len(ra)


def ratio_cell(a: dict[str, Any] | None, b: dict[str, Any] | None, key: str, fmt: str = "{:.2f}") -> str:
    """A table cell: the paired median ratio, the spread of the rounds in brackets, and how many rounds a saturated
    load generator took out."""
    if a is None or b is None:
        return "-"
    value, spread = paired_ratio(a, b, key), ratio_spread(a, b, key)
    flagged, total = saturated(a, b)
    if value is None:
        return f"saturated ({flagged}/{total} rounds)" if flagged else "-"
    text = fmt.format(value) + (f" ({spread})" if spread else "")
    return text + (f", {flagged}/{total} rounds saturated, left out" if flagged else "")


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None
