"""Dead letters in the state store: what could not be processed or could not succeed, and why.

Three kinds arrive: a task whose attempts are exhausted (written by the aggregator in the transaction
that fails the task), a task no live agent took in time, and a message that could not be parsed or
handled (both through the dead-letter queue, written by the dlq-replayer).
Keys: (ns, "dlq", id) → record; ids sort by arrival.
"""

from __future__ import annotations

import base64
import time
from typing import Any

import orjson

from switchboard.protocol import new_id
from switchboard.settings import Settings
from switchboard.state import Store, Transaction, pack, prefix_range

FILTERS = ("capability", "reason", "workflow_id", "since", "until", "status")


def make_record(*, reason: str, queue: str, body: bytes | None = None, envelope: dict | None = None,
                headers: dict | None = None, message_id: str | None = None, **extra: Any) -> dict:
    if envelope is None and body is not None:
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = None
        envelope = parsed if isinstance(parsed, dict) and "type" in parsed else None
    payload = (envelope or {}).get("payload")
    capability = payload.get("capability") if isinstance(payload, dict) else None
    return {
        "id": new_id(), "reason": reason, "queue": queue, "received_at": time.time(), "status": "dead",
        "message_id": message_id, "headers": {k: str(v) for k, v in (headers or {}).items()},
        "envelope": envelope,
        "body_base64": None if envelope is not None or body is None else base64.b64encode(body).decode(),
        "workflow_id": (envelope or {}).get("workflow_id"), "task_id": (envelope or {}).get("task_id"),
        "capability": capability, **extra,
    }


def put(tr: Transaction, ns: str, record: dict) -> None:
    tr.set(pack(ns, "dlq", record["id"]), orjson.dumps(record))


def matches(record: dict, filters: dict) -> bool:
    for key, value in filters.items():
        if value is None:
            continue
        if key == "since" and record["received_at"] < value:
            return False
        if key == "until" and record["received_at"] >= value:
            return False
        if key == "reason" and value.lower() not in record["reason"].lower():
            return False
        if key in ("capability", "workflow_id", "status") and record.get(key) != value:
            return False
    return True


class DeadLetters:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.ns = settings.namespace

    async def add(self, record: dict) -> str:
        await self.store.transact(put, self.ns, record)
        return record["id"]

    async def list(self, *, limit: int = 100, after: str | None = None, scan_limit: int = 10_000,
                   **filters: Any) -> list[dict]:
        """Oldest first, filtered; `after` is the last id of the previous page."""

        def txn(tr: Transaction) -> list[dict]:
            begin, end = prefix_range(self.ns, "dlq")
            if after:
                begin = pack(self.ns, "dlq", after) + b"\x00"
            out = []
            for _, raw in tr.get_range(begin, end, limit=scan_limit):
                record = orjson.loads(raw)
                if matches(record, filters):
                    out.append(record)
                    if len(out) == limit:
                        break
            return out

        return await self.store.read(txn)

    async def get(self, dl_id: str) -> dict | None:
        def txn(tr: Transaction):
            raw = tr.get(pack(self.ns, "dlq", dl_id))
            return orjson.loads(raw) if raw else None

        return await self.store.read(txn)

    async def delete(self, dl_id: str) -> bool:
        def txn(tr: Transaction) -> bool:
            key = pack(self.ns, "dlq", dl_id)
            if tr.get(key) is None:
                return False
            tr.clear(key)
            return True

        return await self.store.transact(txn)
