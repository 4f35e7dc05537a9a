"""The shipment_report program, run by tools/shipment_report.py in a sandbox: reads its request as JSON on stdin,
the operations database (a read-only copy in the working directory), and prints a late-shipment report per carrier
as JSON on stdout. A request it cannot serve exits with status 2 and says why on stderr. Standard library only."""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

LATE = "julianday(COALESCE(s.delivered_at, :as_of)) > julianday(s.promised_at) OR s.status IN ('delayed', 'exception')"
FILTERS = {
    "late": LATE,
    "all": "1",
    "delayed": "s.status = 'delayed'",
    "exception": "s.status = 'exception'",
    "in_transit": "s.status = 'in_transit'",
    "delivered": "s.status = 'delivered'",
}

QUERY = """
SELECT c.name, c.mode, c.on_time_target_pct, s.tracking_number, s.status, s.promised_at, s.delivered_at,
       s.delay_reason,
       ROUND(MAX(0, julianday(COALESCE(s.delivered_at, :as_of)) - julianday(s.promised_at)) * 24, 1) AS delay_h
FROM shipments s JOIN carriers c ON c.id = s.carrier_id
WHERE ({where}) AND (:carrier IS NULL OR instr(lower(c.name), lower(:carrier)) > 0)
ORDER BY c.name, delay_h DESC, s.tracking_number
"""


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def report(conn: sqlite3.Connection, request: dict[str, Any]) -> dict[str, Any]:
    status = request.get("status", "late")
    if status not in FILTERS:
        fail(f"unknown status {status!r}; one of {', '.join(FILTERS)}")
    carrier = request.get("carrier")
    top = int(request.get("top", 5))
    as_of = conn.execute("SELECT MAX(MAX(shipped_at), MAX(COALESCE(delivered_at, ''))) FROM shipments").fetchone()[0]
    carriers = [row[0] for row in conn.execute("SELECT name FROM carriers ORDER BY name")]
    if carrier is not None and not any(carrier.lower() in name.lower() for name in carriers):
        fail(f"no carrier matches {carrier!r}; the carriers are: {', '.join(carriers)}")
    totals = dict(
        conn.execute(
            "SELECT c.name, COUNT(*) FROM shipments s JOIN carriers c ON c.id = s.carrier_id GROUP BY c.name"
        ).fetchall()
    )
    params = {"as_of": as_of, "carrier": carrier}
    groups: dict[str, dict[str, Any]] = {}
    for name, mode, target, tracking, state, promised, delivered, reason, delay_h in conn.execute(
        QUERY.format(where=FILTERS[status]), params
    ):
        group = groups.setdefault(
            name,
            {
                "carrier": name,
                "mode": mode,
                "on_time_target_pct": target,
                "shipments": totals.get(name, 0),
                "matching": 0,
                "worst_delay_h": 0.0,
                "total_delay_h": 0.0,
                "worst": [],
            },
        )
        group["matching"] += 1
        group["worst_delay_h"] = max(group["worst_delay_h"], delay_h)
        group["total_delay_h"] = round(group["total_delay_h"] + delay_h, 1)
        if len(group["worst"]) < top:
            group["worst"].append(
                {
                    "tracking_number": tracking,
                    "status": state,
                    "promised_at": promised,
                    "delivered_at": delivered,
                    "delay_h": delay_h,
                    "delay_reason": reason,
                }
            )
    ranked = sorted(groups.values(), key=lambda g: (-g["matching"], -g["worst_delay_h"], g["carrier"]))
    return {
        "as_of": as_of,
        "status": status,
        "carrier": carrier,
        "matching": sum(g["matching"] for g in ranked),
        "carriers": ranked,
    }


def main() -> None:
    request = json.load(sys.stdin)
    db = Path(request["db"])
    if db.name != request["db"] or not db.is_file():  # a plain name in the working directory, nothing else
        fail(f"database {request['db']!r} not found in the working directory")
    conn = sqlite3.connect(f"file:{db}?mode=ro&immutable=1", uri=True)
    try:
        json.dump(report(conn, request), sys.stdout)
    finally:
        conn.close()


if __name__ == "__main__":
    main()
