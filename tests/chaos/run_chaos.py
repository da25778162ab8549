"""The long chaos run (`make chaos`): every scenario of tests/chaos at a larger scale, then a table of the
recovery time measured for each kill and restart.

    python -m tests.chaos.run_chaos [--scale 4] [--seed N] [-k EXPR] [pytest args...]

Scale 1 is what CI runs; the default here, 4, gives scenario 1 about 4,800 tasks (the requirement is at
least 2,000) with every service killed twice. RabbitMQ and Redis come from AMQP_URL / REDIS_URL as for the
rest of the tests (default: the local ones); the scenarios that restart a server start a private one.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def table(records: list[dict]) -> str:
    out = []
    kills = [r for r in records if "recovery_s" in r]
    if kills:
        out.append("Recovery after each kill or restart, from the kill (ready: every process answers /readyz "
                   "again; recovered: also a workflow submitted after the restart has completed: work flows)")
        out.append(f"{'scenario':<44} {'target':<15} {'downtime':>9} {'ready':>8} {'recovered':>10} "
                   f"{'outstanding':>12}")
        for r in kills:
            ready = f"{r['ready_s']:.2f}s" if isinstance(r.get("ready_s"), (int, float)) else "-"
            out.append(f"{r['scenario']:<44} {r['target']:<15} {r.get('downtime_s') or 0:>8.2f}s {ready:>8} "
                       f"{r['recovery_s']:>9.2f}s {r.get('tasks_outstanding', ''):>12}")
        by_target: dict[str, list[float]] = {}
        for r in kills:
            by_target.setdefault(r["target"], []).append(r["recovery_s"])
        out.append("")
        out.append(f"{'target':<15} {'kills':>5} {'median':>8} {'max':>8}")
        for target, values in by_target.items():
            out.append(f"{target:<15} {len(values):>5} {statistics.median(values):>7.2f}s {max(values):>7.2f}s")
    runs = [r for r in records if r.get("kind") == "run"]
    if runs:
        out.append("")
        out += [f"{r['scenario']}: {r['summary']}" for r in runs]
    servers = [r for r in records if r.get("kind") == "server"]
    if servers:
        out.append("")
        out += [f"{r['scenario']}: {r['what']} took {r['seconds']:.2f}s" for r in servers]
    durations = [r for r in records if r.get("kind") == "duration"]
    if durations:
        out.append("")
        out += [f"{r['scenario']}: {r['seconds']:.1f}s" for r in durations]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=float(os.environ.get("CHAOS_SCALE_LONG", "4")))
    parser.add_argument("--seed", type=int, default=None, help="replay a run (printed by every scenario)")
    parser.add_argument("--results", default=None, help="also keep the measurements as JSON here")
    args, pytest_args = parser.parse_known_args(argv)
    results = Path(args.results) if args.results else Path(tempfile.mkstemp(prefix="chaos-", suffix=".json")[1])
    env = {**os.environ, "CHAOS_SCALE": str(args.scale), "CHAOS_RESULTS": str(results)}
    env.setdefault("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/15")
    if args.seed is not None:
        env["CHAOS_SEED"] = str(args.seed)
    command = [sys.executable, "-m", "pytest", "tests/chaos", "-p", "no:cacheprovider", "-s", "-q",
               "-o", "timeout=3600", *pytest_args]
    print(f"chaos (long): scale {args.scale}: {' '.join(command)}", flush=True)
    began = time.monotonic()
    code = subprocess.call(command, cwd=ROOT, env=env)
    records = json.loads(results.read_text()) if results.exists() and results.stat().st_size else []
    print("\n" + "=" * 100)
    print(f"chaos (long), scale {args.scale}, {time.monotonic() - began:.0f}s, pytest exit {code}")
    print(table(records) if records else "no measurements were recorded")
    if not args.results:
        results.unlink(missing_ok=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
