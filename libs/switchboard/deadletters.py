"""Dead letters in the state store: what could not be processed, where it came from, and why.

Keys: (ns, "dlq", id) → record. Ids sort by arrival, so listing is oldest-first by key.
"""

from __future__ import annotations

import base64
import time

import orjson

from switchboard.protocol import new_id
from switchboard.settings import Settings
from switchboard.state import Store, Transaction, pack, prefix_range


class DeadLetters:
    def __init__(self, store: Store, settings: Settings):
        self.store = store
        self.ns = settings.namespace

    async def add(self, *, reason: str, queue: str, body: bytes, headers: dict, message_id: str | None) -> str:
        try:
            envelope = orjson.loads(body)
        except orjson.JSONDecodeError:
            envelope = None
        if not isinstance(envelope, dict):
            envelope = None
        record = {
            "id": new_id(), "reason": reason, "queue": queue, "received_at": time.time(),
            "message_id": message_id, "headers": {k: str(v) for k, v in headers.items()},
            "envelope": envelope,
            "body_base64": None if envelope is not None else base64.b64encode(body).decode(),
            "workflow_id": (envelope or {}).get("workflow_id"), "task_id": (envelope or {}).get("task_id"),
        }

        def txn(tr: Transaction) -> None:
            tr.set(pack(self.ns, "dlq", record["id"]), orjson.dumps(record))

        await self.store.transact(txn)
        return record["id"]

    async def list(self, *, limit: int = 100, after: str | None = None) -> list[dict]:
        def txn(tr: Transaction) -> list[dict]:
            begin, end = prefix_range(self.ns, "dlq")
            if after:
                begin = pack(self.ns, "dlq", after) + b"\x00"
            return [orjson.loads(v) for _, v in tr.get_range(begin, end, limit=limit)]

        return await self.store.transact(txn)
