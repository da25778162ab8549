"""Dead letters in the state store: what could not be processed or could not succeed, and why.

Three kinds arrive: a task whose attempts are exhausted (written by the aggregator in the transaction
that fails the task), a task no live agent took in time, and a message that could not be parsed or
handled (both through the dead-letter queue, written by the dlq-replayer); among the last, "forged":
an outcome from a broker user other than the one its attempt belongs to (workflows.Forged).
Keys: (ns, "dlq", id) → record; ids sort by arrival. (ns, "dlq_dead", reason class, id) → b"" indexes the
records not yet replayed by the class of their reason, so counting them reads no record.
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


REASONS = ("attempts_exhausted", "non_retryable", "undeliverable", "unparseable", "rejected", "expired", "forged",
           "other")
COUNT_LIMIT = 100_000  # dead letters counted per reason class, at most


def reason_class(reason: str) -> str:
    """The few kinds of reason, for metrics: the reason itself is free text."""
    text = reason.lower()
    for prefix, kind in (("attempts exhausted", "attempts_exhausted"), ("non-retryable", "non_retryable"),
                         ("no live agent", "undeliverable"), ("unparseable", "unparseable"),
                         ("expired", "expired"), ("maxlen", "expired"), ("delivery_limit", "expired"),
                         ("rejected", "rejected"), ("forged:", "forged")):
        if text.startswith(prefix):
            return kind
    # The bus dead-letters what a handler refused as "<ExceptionType>: <message>".
    head = reason.split(":", 1)[0]
    return "rejected" if head.isidentifier() and ":" in reason else "other"


def _dead_key(ns: str, record: dict) -> bytes:
    return pack(ns, "dlq_dead", reason_class(record["reason"]), record["id"])


def put(tr: Transaction, ns: str, record: dict) -> None:
    tr.set(pack(ns, "dlq", record["id"]), orjson.dumps(record))
    if record["status"] == "dead":
        tr.set(_dead_key(ns, record), b"")


def mark_replayed(tr: Transaction, ns: str, record: dict, at: float) -> None:
    record.update(status="replayed", replayed_at=at)
    tr.set(pack(ns, "dlq", record["id"]), orjson.dumps(record))
    tr.clear(_dead_key(ns, record))


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
            raw = tr.get(key)
            if raw is None:
                return False
            tr.clear(key)
            tr.clear(_dead_key(self.ns, orjson.loads(raw)))
            return True

        return await self.store.transact(txn)

    async def count_dead(self) -> dict[str, int]:
        """Dead letters not replayed, by reason class."""

        def txn(tr: Transaction) -> dict[str, int]:
            return {kind: len(tr.get_range(*prefix_range(self.ns, "dlq_dead", kind), limit=COUNT_LIMIT))
                    for kind in REASONS}

        return await self.store.read(txn)
