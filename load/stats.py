"""Locust's results, as load/locustfile.py writes them when the run stops (LOAD_STATS, a JSON file of
its stats objects): per endpoint the request and failure counts, p50/p95/p99 and throughput, plus the
failures and the exceptions raised in user code. Reading a file keeps the driver free of locust (and
of gevent's patching) in its own process. Locust's own CSVs and HTML report are written beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

EMPTY = {"endpoints": [], "failures": [], "exceptions": [],
         "total": {"name": "all requests", "requests": 0, "failures": 0, "p50_ms": None, "p95_ms": None,
                   "p99_ms": None, "max_ms": None, "rps": 0.0}}


def read(path: Path) -> dict:
    """{endpoints: [{name, requests, failures, p50_ms, p95_ms, p99_ms, max_ms, rps}], total: {...},
    failures: [{endpoint, error, occurrences}], exceptions: [{count, message}]}; EMPTY if locust wrote none."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return EMPTY


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(result: dict) -> str:
    rows = [*result["endpoints"], result["total"]]
    width = max(24, *(len(r["name"]) + 2 for r in rows))
    head = f"{'endpoint':<{width}}{'requests':>10}{'failures':>10}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}" \
           f"{'max ms':>9}{'req/s':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        if r is result["total"]:
            lines.append("-" * len(head))
        lines.append(f"{r['name']:<{width}}{r['requests']:>10,}{r['failures']:>10,}{_ms(r['p50_ms']):>9}"
                     f"{_ms(r['p95_ms']):>9}{_ms(r['p99_ms']):>9}{_ms(r['max_ms']):>9}{r['rps'] or 0:>9.1f}")
    for f in result["failures"]:
        lines.append(f"failure: {f['endpoint']}: {f['error']} (x{f['occurrences']})")
    for e in result["exceptions"]:
        lines.append(f"exception in a user: {e['message']} (x{e['count']})")
    return "\n".join(lines)
