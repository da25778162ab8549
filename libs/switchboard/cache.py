"""The result cache: a task with `cache: {"ttl_s": T, "key"?: K}` whose result is known takes it without
running. The rules and the store records; WorkflowStore applies them in the transaction that queues a
task (a fresh entry: the task succeeds there, marked `cached` with where the result came from) and in the
one that records a result (the entry is written).

Keys. By default a hash of the capability, the payload and the parents' results (keyed by parent id), as
JSON with sorted keys; with `key`, the capability and that key, whatever the payload. Either way per
owner (the token that submitted; delegated work belongs to its parent's token): a result never reaches
another token's workflows. With payload encryption the payload is hashed before it is sealed, under a
secret derived from the sealing key (a plain hash beside the ciphertext would let a reader of the store
confirm a guessed payload); so rotating the key starts the cache afresh. Parents' results are hashed as
stored: each run seals its result anew, so with encryption on, a task with parents hits only with `key`.

Bounds: at most MAX_ENTRIES entries and MAX_BYTES of results. Writing one more evicts those nearest
their expiry (for one ttl, the oldest), at most EVICT_LIMIT a write; without room then, the result is not
cached. Expired entries are dropped when looked up, and by expire() (WorkflowStore.expire_cache, which the
coordinator's watchdog calls every second).

Records (fdb.tuple packed):
  (ns, "cache", key) → {result, workflow_id, task_id, capability, at, expires, bytes}
  (ns, "cache-exp", expires, key) → bytes        the entries by expiry
  (ns, "cache-size") → {entries, bytes}          what the entries hold
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

import orjson

from switchboard.codec import parse_keys
from switchboard.state import Transaction, pack, prefix_range, unpack

MAX_ENTRIES = 10_000
MAX_BYTES = 256 * 1024 * 1024
EVICT_LIMIT = 100
EXPIRE_BATCH = 500  # entries dropped by one expire() transaction


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


def secret(payload_keys: str) -> bytes | None:
    """What payload digests are keyed with: derived from the sealing key, None without encryption."""
    keys = parse_keys(payload_keys) if payload_keys else {}
    first = next(iter(keys.values()), None)
    return None if first is None else hmac.new(first, b"switchboard/cache-key/v1", hashlib.sha256).digest()


def payload_digest(payload: Any, key: bytes | None) -> str:
    """The payload's share of a default cache key; taken before the payload is sealed."""
    data = _canonical(payload)
    return (hmac.new(key, data, hashlib.sha256) if key else hashlib.sha256(data)).hexdigest()


def key_of(task: dict, owner: str | None, inputs: dict, secret_key: bytes | None) -> str:
    """The cache key of a task about to be queued with these inputs (its parents' results)."""
    policy = task["cache"]
    if policy.get("key"):
        parts = [owner, task["capability"], "key", policy["key"]]
    else:
        digest = task.get("cache_payload") or payload_digest(task["payload"], secret_key)
        parts = [owner, task["capability"], "auto", digest, inputs]
    return hashlib.sha256(_canonical(parts)).hexdigest()


def cached_from(entry: dict) -> dict:
    """What a task that took the entry's result shows as `cached`."""
    return {"workflow_id": entry["workflow_id"], "task_id": entry["task_id"], "at": entry["at"]}


def look_up(tr: Transaction, ns: str, key: str, now: float) -> tuple[dict | None, str]:
    """The fresh entry under key, or None; and the outcome: hit, miss or expired (then dropped)."""
    raw = tr.get(pack(ns, "cache", key))
    if raw is None:
        return None, "miss"
    entry = orjson.loads(raw)
    if entry["expires"] <= now:
        _drop(tr, ns, key, entry["expires"], entry["bytes"])
        return None, "expired"
    return entry, "hit"


def put(tr: Transaction, ns: str, key: str, *, result: Any, workflow_id: str, task_id: str, capability: str,
        ttl_s: float, now: float) -> bool:
    """Caches a result (replacing what the key held); False if there was no room for it."""
    raw = tr.get(pack(ns, "cache", key))
    if raw is not None:
        old = orjson.loads(raw)
        _drop(tr, ns, key, old["expires"], old["bytes"])
    size = len(_canonical(result))
    if not _make_room(tr, ns, size):
        return False
    entry = {"result": result, "workflow_id": workflow_id, "task_id": task_id, "capability": capability,
             "at": now, "expires": now + ttl_s, "bytes": size}
    tr.set(pack(ns, "cache", key), orjson.dumps(entry))
    tr.set(pack(ns, "cache-exp", entry["expires"], key), orjson.dumps(size))
    _resize(tr, ns, 1, size)
    return True


def expire(tr: Transaction, ns: str, now: float, limit: int = EXPIRE_BATCH) -> int:
    """Drops up to `limit` expired entries; returns how many."""
    begin, _ = prefix_range(ns, "cache-exp")
    rows = tr.get_range(begin, pack(ns, "cache-exp", now), limit=limit)
    for index, raw in rows:
        *_, expires, key = unpack(index)
        _drop(tr, ns, key, expires, orjson.loads(raw))
    return len(rows)


def entry(tr: Transaction, ns: str, key: str) -> dict | None:
    raw = tr.get(pack(ns, "cache", key))
    return orjson.loads(raw) if raw else None


def size(tr: Transaction, ns: str) -> dict:
    raw = tr.get(pack(ns, "cache-size"))
    return orjson.loads(raw) if raw else {"entries": 0, "bytes": 0}


def _make_room(tr: Transaction, ns: str, needed: int) -> bool:
    if needed > MAX_BYTES:
        return False
    held = size(tr, ns)
    entries, used = held["entries"], held["bytes"]
    if entries < MAX_ENTRIES and used + needed <= MAX_BYTES:
        return True
    for index, raw in tr.get_range(*prefix_range(ns, "cache-exp"), limit=EVICT_LIMIT):
        *_, expires, key = unpack(index)
        freed = orjson.loads(raw)
        _drop(tr, ns, key, expires, freed)
        entries, used = entries - 1, used - freed
        if entries < MAX_ENTRIES and used + needed <= MAX_BYTES:
            return True
    return False


def _drop(tr: Transaction, ns: str, key: str, expires: float, nbytes: int) -> None:
    tr.clear(pack(ns, "cache", key))
    tr.clear(pack(ns, "cache-exp", expires, key))
    _resize(tr, ns, -1, -nbytes)


def _resize(tr: Transaction, ns: str, entries: int, nbytes: int) -> None:
    held = size(tr, ns)
    tr.set(pack(ns, "cache-size"), orjson.dumps({"entries": max(0, held["entries"] + entries),
                                                  "bytes": max(0, held["bytes"] + nbytes)}))
