"""An agent process for the limit tests:

    python -m tests.limits_agent --name N --log FILE [--concurrency C]

Its "limited" handler appends {"agent", "id", "key", "start"} to FILE as it starts (one flushed write, so
the line survives a SIGKILL), sleeps the payload's `sleep_s`, then appends {"agent", "id", "end"}: the
handlers' own timestamps, by which the tests count rates and overlaps. Other settings come from SWITCHBOARD_*.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import orjson

from switchboard import Agent
from switchboard.settings import Settings


async def spawn(settings: Settings, name: str, log: str, *extra: str):
    """Starts this agent as a process of its own, on the settings' platform."""
    from tests.harness import free_port, process_env

    env = {**process_env(settings), "SWITCHBOARD_HEALTH_PORT": str(free_port())}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.limits_agent", "--name", name, "--log", log, *extra, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


def runs(log: str) -> list[dict]:
    """Each run: {agent, id, key, start, end (None if it never ended)}, by start."""
    starts: list[dict] = []
    ends: dict[tuple[str, str], list[float]] = {}  # (agent, id) → its ends: a killed agent's run has none
    with open(log, "rb") as f:
        for entry in map(orjson.loads, f.read().splitlines()):
            if "start" in entry:
                starts.append({**entry, "end": None})
            else:
                ends.setdefault((entry["agent"], entry["id"]), []).append(entry["end"])
    out = sorted(starts, key=lambda r: r["start"])
    for run in out:  # the earliest end after its start, on the same agent
        mine = ends.get((run["agent"], run["id"]), [])
        later = [e for e in mine if e >= run["start"]]
        if later:
            run["end"] = min(later)
            mine.remove(run["end"])
    return out


def most_at_once(runs: list[dict], until: float) -> int:
    """The most runs that overlapped; a run that never ended (its agent was killed) lasts until `until`."""
    edges = sorted([(r["start"], 1) for r in runs] + [(r["end"] or until, -1) for r in runs],
                   key=lambda e: (e[0], e[1]))
    most = now = 0
    for _, step in edges:
        now += step
        most = max(most, now)
    return most


def most_in_window(starts: list[float], window_s: float = 1.0) -> int:
    """The most starts within any window of window_s (half-open)."""
    starts = sorted(starts)
    most, first = 0, 0
    for last, t in enumerate(starts):
        while t - starts[first] >= window_s:
            first += 1
        most = max(most, last - first + 1)
    return most


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    agent = Agent(args.name, concurrency=args.concurrency)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @agent.handler("limited")
    async def limited(task):
        os.write(fd, orjson.dumps({"agent": args.name, "id": task.payload["id"], "key": task.payload.get("key"),
                                   "start": time.time()}) + b"\n")
        await asyncio.sleep(task.payload.get("sleep_s", 0))
        os.write(fd, orjson.dumps({"agent": args.name, "id": task.payload["id"], "end": time.time()}) + b"\n")
        return {"agent": args.name}

    agent.run()


if __name__ == "__main__":
    main()
