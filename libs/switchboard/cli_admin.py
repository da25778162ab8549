"""The `switchboard token`, `switchboard keys` and `switchboard audit` commands.

`token create|list|revoke` call the REST API (--api or SWITCHBOARD_API_URL, with an admin token from
--token, SWITCHBOARD_TOKEN or the bootstrap SWITCHBOARD_API_TOKEN). `audit verify` reads the state store
itself (STORE_URL), so that it checks the chain as stored, not as an api reports it; `keys reencrypt`
also works on the store, with SWITCHBOARD_PAYLOAD_KEYS.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

from switchboard.cli_client import Api, emit, options, run
from switchboard.settings import Settings


def add_parsers(sub) -> None:
    token = sub.add_parser("token", help="(admin) create, list and revoke API tokens", parents=[options()])
    actions = token.add_subparsers(dest="action", required=True)
    leaf = [options(nested=True)]
    create = actions.add_parser("create", help="make a token; it is shown once", parents=leaf)
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["reader", "submitter", "operator", "admin"])
    create.add_argument("--expires-in", type=float, default=None, metavar="SECONDS")
    actions.add_parser("list", help="every token, without secrets", parents=leaf)
    revoke = actions.add_parser("revoke", help="refuse a token from now on", parents=leaf)
    revoke.add_argument("id")
    keys = sub.add_parser("keys", help="(admin) payload encryption keys")
    keys_actions = keys.add_subparsers(dest="action", required=True)
    keys_actions.add_parser("generate", help="print a new random key, to add to SWITCHBOARD_PAYLOAD_KEYS")
    keys_actions.add_parser("reencrypt", help="seal every stored payload and result with the current key")
    audit = sub.add_parser("audit", help="(admin) the audit log")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    audit_actions.add_parser("verify", help="check the audit log's hash chain in the store")


def token(settings: Settings, args: argparse.Namespace) -> int:
    return run(settings, args, _token)


def _token(api: Api, args: argparse.Namespace) -> int:
    if args.action == "create":
        body = api.post("/v1/tokens", {"name": args.name, "role": args.role, "expires_in_s": args.expires_in})
    elif args.action == "list":
        body = api.get("/v1/tokens")
    else:
        body = api.call("DELETE", f"/v1/tokens/{args.id}")
    emit(args, body, lambda b: _token_text(args.action, b))
    return 0


def _token_text(action: str, body: dict) -> str:
    if action == "create":
        return f"{body['token']}\n(token {body['id']}, {body['role']}: shown this once, keep it now)"
    if action == "list":
        lines = []
        for t in body["tokens"]:
            expired = t["expires_at"] and t["expires_at"] < time.time()
            state = "revoked" if t["revoked_at"] else ("expired" if expired else "active")
            lines.append(f"{t['id']}  {t['role']:9}  {state:7}  {t['name']}")
        return "\n".join(lines)
    return f"revoked {body['id']} ({body['name']})"


def audit_verify(settings: Settings) -> int:
    from switchboard.audit import AuditLog
    from switchboard.state import open_store

    async def verify() -> tuple[int, str | None]:
        store = open_store(settings.store_url)
        try:
            return await AuditLog(store, settings.namespace).verify()
        finally:
            await store.close()

    checked, broken = asyncio.run(verify())
    if broken:
        print(f"the chain breaks after {checked} good records: {broken}")
        return 1
    print(f"{checked} records, the chain holds")
    return 0


def keys(settings: Settings, args: argparse.Namespace) -> int:
    from switchboard.codec import Codec, CodecError, new_key

    if args.action == "generate":
        print(f"k{time.strftime('%Y%m%d')}:{new_key()}")
        return 0
    from switchboard.state import open_store
    from switchboard.workflows import WorkflowStore

    codec = Codec.from_setting(settings.payload_keys)
    if not codec.enabled:
        print("SWITCHBOARD_PAYLOAD_KEYS is empty: there is no key to seal with", file=sys.stderr)
        return 2

    async def reseal() -> int:
        store = open_store(settings.store_url)
        try:
            return await WorkflowStore(store, settings).reseal(codec)
        finally:
            await store.close()

    try:
        changed = asyncio.run(reseal())
    except CodecError as exc:
        print(f"cannot reencrypt: {exc}", file=sys.stderr)
        return 1
    print(f"{changed} records sealed again with key {codec.current!r}")
    return 0
