"""Stream events: what changed, for people watching (the console, `GET /v1/events`), not for the platform.

Whoever commits a change publishes it afterwards to the `<ns>.events` topic exchange, one message per
committed batch: an EVENT envelope whose payload is {"changes": [change, ...]}. Each change is a small
dict with `event` (task, workflow, agents, dlq or control) and `at` (when it was committed; a client
keeps the newest per task or workflow, since two publishers' messages may arrive in either order).
Routing keys: `wf.<workflow_id>` (or `wf.batch` when a batch touched several workflows), `agents`,
`dlq`, `control`; the api binds `#`.

Changes carry summaries, never payloads or results (those may be large or sealed): a client that wants
more reads the REST API. Nobody depends on these messages for correctness, so a failed publish is
logged and dropped rather than failing what it describes.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from switchboard.protocol import Envelope, MessageType

if TYPE_CHECKING:
    from switchboard.bus import Bus

log = logging.getLogger(__name__)

CHANGES_PER_MESSAGE = 500  # bounds a message: a cancelled workflow of 10,000 tasks is 20 messages
ERROR_CHARS = 300
# While a stream client is connected somewhere, its api broadcasts "stream.watch" on the control exchange
# this often, and each service that commits workflow changes collects them for WATCH_S after the last
# one. Nobody watching, they cost nothing: measured, collecting and publishing them on every commit took
# about 15% of the benchmark's throughput.
WATCH_EVERY_S = 5.0
WATCH_S = 15.0
_watched_until: float | None = None  # None: this process always publishes (it follows no controls)


def gate() -> None:
    """From now on this process collects changes only while someone watches (see watch())."""
    global _watched_until
    if _watched_until is None:
        _watched_until = 0.0


def watch(for_s: float = WATCH_S) -> None:
    global _watched_until
    _watched_until = max(_watched_until or 0.0, time.monotonic() + min(max(for_s, 0.0), 60.0))


def watched() -> bool:
    return _watched_until is None or time.monotonic() < _watched_until


def watch_message(source: str) -> Envelope:
    return Envelope(type=MessageType.CONTROL, subject="stream.watch", source=source, payload={"for_s": WATCH_S})


def task_change(wf_id: str, task: dict) -> dict:
    error = task.get("error")
    return {
        "event": "task", "at": time.time(), "workflow_id": wf_id, "task_id": task["id"],
        "status": task["status"], "attempt": task.get("attempts", 0), "capability": task.get("capability"),
        "ran_on": task.get("ran_on"), "reason": (task.get("reason") or None) and str(task["reason"])[:ERROR_CHARS],
        "error": {"type": error.get("type"), "message": str(error.get("message", ""))[:ERROR_CHARS]}
        if isinstance(error, dict) else None,
        "queued_at": task.get("queued_at"), "started_at": task.get("started_at"),
        "finished_at": task.get("finished_at"),
    }


def workflow_change(wf: dict) -> dict:
    parent = wf.get("parent")
    return {
        "event": "workflow", "at": time.time(), "workflow_id": wf["id"], "name": wf.get("name"),
        "status": wf["status"], "tasks": len(wf.get("task_ids") or ()),
        "parent": {"workflow_id": parent.get("workflow_id"), "task_id": parent.get("task_id")}
        if isinstance(parent, dict) else None,
        "owner": wf.get("owner"), "error": str(wf["error"])[:ERROR_CHARS] if wf.get("error") else None,
        "created_at": wf.get("created_at"), "finished_at": wf.get("finished_at"),
    }


def dead_letter_change(record: dict, change: str) -> dict:
    """change: added, replayed or deleted."""
    return {"event": "dlq", "at": time.time(), "change": change, "id": record.get("id"),
            "reason": str(record.get("reason") or "")[:ERROR_CHARS], "workflow_id": record.get("workflow_id"),
            "task_id": record.get("task_id"), "capability": record.get("capability")}


def control_change(state: dict) -> dict:
    return {"event": "control", "at": time.time(), **state}


def agent_change(agent: dict, change: str) -> dict:
    """change: registered, lost or stopped."""
    return {"event": "agents", "at": time.time(), "change": change, "name": agent.get("name"),
            "capabilities": agent.get("capabilities") or [], "host": agent.get("host"), "pid": agent.get("pid")}


def routing_key(changes: list[dict]) -> str:
    kinds = {c["event"] for c in changes}
    if kinds <= {"task", "workflow"}:
        workflows = {c["workflow_id"] for c in changes}
        return f"wf.{workflows.pop()}" if len(workflows) == 1 else "wf.batch"
    return kinds.pop() if len(kinds) == 1 else "mixed"


async def publish(bus: Bus, changes: list[dict]) -> None:
    """Publishes committed changes (confirmed, through the bus's one publish path), a bounded message at
    a time. Never raises: a notification lost to a broker outage must not fail the change itself."""
    for start in range(0, len(changes), CHANGES_PER_MESSAGE):
        part = changes[start:start + CHANGES_PER_MESSAGE]
        env = Envelope(type=MessageType.EVENT, subject="stream.changes", source=bus.source, payload={"changes": part})
        try:
            await bus.publish(env, routing_key(part), exchange=bus.topology.events)
        except Exception as exc:  # noqa: BLE001 (see the docstring)
            log.warning("stream events not published (%d changes): %s", len(part), exc)
            return
