"""The audit log: who did what to what, and how it ended, append-only in the state store.

Each record carries the hash of the one before it (SHA-256 over the previous hash and the record's own
canonical JSON), so editing, removing or reordering a record breaks the chain from there on; `verify`
names the first broken link. A record holds ts, actor (token id and name), role, action, target,
outcome, request id and trace id: never a token or a payload.
Keys: (ns, "audit", seq) → record; (ns, "audit_head") → {"seq", "hash"} of the last record.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import orjson

from switchboard.state import Store, Transaction, pack, prefix_range, unpack

log = logging.getLogger(__name__)

GENESIS = "0" * 64
_FIELDS = ("seq", "ts", "actor", "role", "action", "target", "outcome", "request_id", "trace_id", "prev")


def chain_hash(record: dict) -> str:
    body = orjson.dumps({k: record.get(k) for k in _FIELDS}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(record["prev"].encode() + body).hexdigest()


class AuditLog:
    def __init__(self, store: Store, namespace: str):
        self.store, self.ns = store, namespace
        self.head = pack(namespace, "audit_head")

    async def append(self, *, actor: dict, role: str | None, action: str, target: Any, outcome: str,
                     request_id: str | None, trace_id: str | None) -> dict:
        def txn(tr: Transaction) -> dict:
            raw = tr.get(self.head)
            head = orjson.loads(raw) if raw else {"seq": 0, "hash": GENESIS}
            record = {"seq": head["seq"] + 1, "ts": time.time(), "actor": actor, "role": role, "action": action,
                      "target": target, "outcome": outcome, "request_id": request_id, "trace_id": trace_id,
                      "prev": head["hash"]}
            record["hash"] = chain_hash(record)
            tr.set(pack(self.ns, "audit", record["seq"]), orjson.dumps(record))
            tr.set(self.head, orjson.dumps({"seq": record["seq"], "hash": record["hash"]}))
            return record

        record = await self.store.transact(txn)
        # The chain's head also goes to the logs (and so to Loki): a copy outside the store to check it by.
        log.info("audit %d %s %s by %s: %s", record["seq"], record["hash"][:16], action, actor.get("name"), outcome)
        return record

    async def list(self, *, since: float | None = None, actor: str | None = None, action: str | None = None,
                   after: int = 0, limit: int = 100, scan: int = 10_000) -> list[dict]:
        """Oldest first, from the record after seq `after`; reads at most `scan` records."""

        def txn(tr: Transaction) -> list[dict]:
            rows = tr.get_range(pack(self.ns, "audit", after + 1), prefix_range(self.ns, "audit")[1], limit=scan)
            out = []
            for _, raw in rows:
                record = orjson.loads(raw)
                if since is not None and record["ts"] < since:
                    continue
                if actor is not None and actor not in (record["actor"].get("id"), record["actor"].get("name")):
                    continue
                if action is not None and record["action"] != action:
                    continue
                out.append(record)
                if len(out) == limit:
                    break
            return out

        return await self.store.read(txn)

    async def verify(self, page: int = 1000) -> tuple[int, str | None]:
        """Walks the chain: (records checked, None) if it holds, else the first broken link, described."""
        checked, prev, expected_seq = 0, GENESIS, 1
        after = 0
        while True:
            def txn(tr: Transaction, after=after) -> list[tuple[bytes, bytes]]:
                return tr.get_range(pack(self.ns, "audit", after + 1), prefix_range(self.ns, "audit")[1], limit=page)

            rows = await self.store.read(txn)
            for key, raw in rows:
                record = orjson.loads(raw)
                seq = unpack(key)[-1]
                if seq != expected_seq or record.get("seq") != seq:
                    return checked, f"record {expected_seq} is missing (found {seq} next)"
                if record.get("prev") != prev:
                    return checked, f"record {seq} does not follow record {seq - 1} (its prev hash differs)"
                if record.get("hash") != chain_hash(record):
                    return checked, f"record {seq} was changed (its hash does not match its content)"
                prev, expected_seq, checked = record["hash"], seq + 1, checked + 1
            if len(rows) < page:
                break
            after = expected_seq - 1
        raw = await self.store.read(lambda tr: tr.get(self.head))
        if raw and orjson.loads(raw)["seq"] != checked:
            return checked, f"the log ends at record {checked} but its head says {orjson.loads(raw)['seq']}"
        return checked, None
