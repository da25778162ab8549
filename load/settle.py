"""After a load run: did every workflow the load created finish, and succeed? Asked through the API.

Each accepted workflow id (load/locustfile.py writes them to a file) is long-polled with
GET /v1/workflows/{id}?wait=... until it is terminal or the deadline passes. A workflow still not
terminal at the deadline is lost; one that ended otherwise than `succeeded` is counted by its status.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path

import httpx

TERMINAL = {"succeeded", "failed", "cancelled", "budget_exceeded"}
PARALLEL = 16
LONG_POLL_S = 10.0


def read_ids(path: Path) -> dict[str, int]:
    """{workflow id: its number of tasks}, from the lines "<id> <tasks>"."""
    if not path.exists():
        return {}
    ids = {}
    for line in path.read_text().splitlines():
        workflow_id, _, tasks = line.partition(" ")
        if workflow_id:
            ids[workflow_id] = int(tasks or 1)
    return ids


async def _status(client: httpx.AsyncClient, workflow_id: str, deadline: float) -> str:
    while True:
        wait = max(0.0, min(LONG_POLL_S, deadline - time.monotonic()))
        try:
            response = await client.get(f"/v1/workflows/{workflow_id}", params={"wait": round(wait, 2)})
        except httpx.TransportError as exc:
            if time.monotonic() > deadline:
                return f"unreachable ({type(exc).__name__})"
            await asyncio.sleep(0.5)  # back off from an api that does not answer, then ask again
            continue
        if response.status_code == 429:  # a rate-limited api: wait as it asks, then ask again
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            continue
        if response.status_code != 200:
            return f"http {response.status_code}"
        status = response.json()["status"]
        if status in TERMINAL or time.monotonic() >= deadline:
            return status


async def check(url: str, ids: dict[str, int], *, timeout: float, token: str = "") -> dict:
    """{workflows, tasks, succeeded, lost, not_succeeded: {status: n}, lost_ids (a sample), drained_s}"""
    began = time.monotonic()
    deadline = began + timeout
    statuses: dict[str, str] = {}
    finished_at = began
    gate = asyncio.Semaphore(PARALLEL)
    headers = {"authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=LONG_POLL_S + 30) as client:
        async def one(workflow_id: str) -> None:
            nonlocal finished_at
            async with gate:
                statuses[workflow_id] = await _status(client, workflow_id, deadline)
                finished_at = max(finished_at, time.monotonic())

        await asyncio.gather(*(one(w) for w in ids))
    counts = Counter(statuses.values())
    lost = [w for w, s in statuses.items() if s not in TERMINAL]
    return {"workflows": len(ids), "tasks": sum(ids.values()), "succeeded": counts.pop("succeeded", 0),
            "lost": len(lost), "lost_ids": lost[:10],
            "not_succeeded": {s: n for s, n in counts.items()},
            "drained_s": round(finished_at - began, 2)}
