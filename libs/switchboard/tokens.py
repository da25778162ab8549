"""API tokens and their roles, in the state store.

A token is shown once, when it is made: `sbt_<id>_<secret>`. The store keeps only its SHA-256 (a token
carries 256 random bits, so a fast hash is enough), its name, role and expiry. The settings' api_token
is the bootstrap admin, which makes the first tokens. Keys: (ns, "token", id) → record.

Roles, each allowing a set of permissions (what a route asks for):
  reader     every read
  submitter  submits, and reads, cancels and answers the questions of the workflows its own token made
             (others look absent)
  operator   everything on workflows, the DLQ and the controls
  admin      also tokens, the audit log and agent credentials
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

import orjson

from switchboard.protocol import new_id
from switchboard.state import Store, Transaction, pack, prefix_range

PREFIX = "sbt_"


class Role(str, enum.Enum):
    READER = "reader"
    SUBMITTER = "submitter"
    OPERATOR = "operator"
    ADMIN = "admin"


_OPERATOR = {"read", "workflows.submit", "workflows.read_own", "workflows.cancel", "workflows.cancel_own",
             "workflows.answer", "workflows.answer_own", "dlq.replay", "dlq.delete", "control"}
PERMISSIONS: dict[Role, frozenset[str]] = {
    Role.READER: frozenset({"read"}),
    Role.SUBMITTER: frozenset({"workflows.submit", "workflows.read_own", "workflows.cancel_own",
                               "workflows.answer_own"}),
    Role.OPERATOR: frozenset(_OPERATOR),
    Role.ADMIN: frozenset(_OPERATOR | {"tokens", "audit", "agent-credentials"}),
}


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a token's id, name and role. `id` None means auth is off (local development)."""

    id: str | None
    name: str
    role: Role

    def may(self, permission: str) -> bool:
        return permission in PERMISSIONS[self.role]


ANONYMOUS = Principal(None, "anonymous", Role.ADMIN)
BOOTSTRAP_ID = "bootstrap"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def public(record: dict) -> dict:
    return {k: record[k] for k in ("id", "name", "role", "created_at", "expires_at", "revoked_at", "created_by")}


class Tokens:
    def __init__(self, store: Store, namespace: str, bootstrap: str = ""):
        self.store, self.ns, self.bootstrap = store, namespace, bootstrap

    def _key(self, token_id: str) -> bytes:
        return pack(self.ns, "token", token_id)

    async def create(self, name: str, role: Role, expires_in_s: float | None, created_by: str | None
                     ) -> tuple[dict, str]:
        """A new token: its public record, and the token itself (never stored)."""
        token_id = new_id()
        token = f"{PREFIX}{token_id}_{secrets.token_urlsafe(32)}"
        now = time.time()
        record = {"id": token_id, "name": name, "role": role.value, "digest": _digest(token), "created_at": now,
                  "expires_at": now + expires_in_s if expires_in_s else None, "revoked_at": None,
                  "created_by": created_by}

        def txn(tr: Transaction) -> None:
            tr.set(self._key(token_id), orjson.dumps(record))

        await self.store.transact(txn)
        return public(record), token

    async def list(self) -> list[dict]:
        def txn(tr: Transaction) -> list[dict]:
            return [public(orjson.loads(v)) for _, v in tr.get_range(*prefix_range(self.ns, "token"))]

        return await self.store.read(txn)

    async def revoke(self, token_id: str) -> dict | None:
        def txn(tr: Transaction) -> dict | None:
            raw = tr.get(self._key(token_id))
            if raw is None:
                return None
            record = orjson.loads(raw)
            if record["revoked_at"] is None:
                record["revoked_at"] = time.time()
                tr.set(self._key(token_id), orjson.dumps(record))
            return public(record)

        return await self.store.transact(txn)

    async def authenticate(self, token: str) -> Principal | None:
        """The principal a bearer token stands for, or None: unknown, revoked or expired."""
        if self.bootstrap and hmac.compare_digest(token.encode(), self.bootstrap.encode()):
            return Principal(BOOTSTRAP_ID, "bootstrap", Role.ADMIN)
        token_id = token.removeprefix(PREFIX).split("_", 1)[0] if token.startswith(PREFIX) else ""
        if not token_id or len(token_id) > 64:
            return None
        raw = await self.store.read(lambda tr: tr.get(self._key(token_id)))
        if raw is None:
            return None
        record = orjson.loads(raw)
        if not hmac.compare_digest(record["digest"], _digest(token)) or record["revoked_at"] is not None:
            return None
        if record["expires_at"] is not None and record["expires_at"] <= time.time():
            return None
        return Principal(record["id"], record["name"], Role(record["role"]))
