"""The `switchboard token`, `switchboard keys` and `switchboard audit` commands.

`token create|list|revoke` call the REST API (--api or SWITCHBOARD_API_URL, with an admin token from
--token, SWITCHBOARD_TOKEN or the bootstrap SWITCHBOARD_API_TOKEN). `audit verify` reads the state store
itself (STORE_URL), so that it checks the chain as stored, not as an api reports it; `keys reencrypt`
also works on the store, with SWITCHBOARD_PAYLOAD_KEYS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

from switchboard.settings import Settings


def add_parsers(sub) -> None:
    token = sub.add_parser("token", help="(admin) create, list and revoke API tokens")
    token.add_argument("--api", default=os.environ.get("SWITCHBOARD_API_URL"), help="API base URL")
    token.add_argument("--token", default=None, help="an admin token (default: SWITCHBOARD_TOKEN)")
    token.add_argument("--output", choices=["text", "json"], default="text")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a token; it is shown once")
    create.add_argument("name")
    create.add_argument("--role", required=True, choices=["reader", "submitter", "operator", "admin"])
    create.add_argument("--expires-in", type=float, default=None, metavar="SECONDS")
    actions.add_parser("list", help="every token, without secrets")
    revoke = actions.add_parser("revoke", help="refuse a token from now on")
    revoke.add_argument("id")
    keys = sub.add_parser("keys", help="(admin) payload encryption keys")
    keys_actions = keys.add_subparsers(dest="action", required=True)
    keys_actions.add_parser("generate", help="print a new random key, to add to SWITCHBOARD_PAYLOAD_KEYS")
    keys_actions.add_parser("reencrypt", help="seal every stored payload and result with the current key")
    audit = sub.add_parser("audit", help="(admin) the audit log")
    audit_actions = audit.add_subparsers(dest="action", required=True)
    audit_actions.add_parser("verify", help="check the audit log's hash chain in the store")


def token(settings: Settings, args: argparse.Namespace) -> int:
    import httpx

    api = args.api or f"http://{settings.api_host}:{settings.api_port}"
    secret = args.token or os.environ.get("SWITCHBOARD_TOKEN") or settings.api_token
    headers = {"Authorization": f"Bearer {secret}"} if secret else {}
    with httpx.Client(base_url=api, headers=headers, timeout=30) as client:
        try:
            if args.action == "create":
                response = client.post("/v1/tokens", json={"name": args.name, "role": args.role,
                                                           "expires_in_s": args.expires_in})
            elif args.action == "list":
                response = client.get("/v1/tokens")
            else:
                response = client.delete(f"/v1/tokens/{args.id}")
        except httpx.HTTPError as exc:
            print(f"no Switchboard API at {api}: {exc}", file=sys.stderr)
            return 1
    body = response.json()
    if response.status_code >= 400:
        print(f"{response.status_code}: {body['error']['message']}", file=sys.stderr)
        return 1
    if args.output == "json":
        print(json.dumps(body, indent=2))
    elif args.action == "create":
        print(f"{body['token']}\n(token {body['id']}, {body['role']}: shown this once, keep it now)")
    elif args.action == "list":
        for t in body["tokens"]:
            state = "revoked" if t["revoked_at"] else ("expired" if t["expires_at"] and t["expires_at"] < time.time() else "active")
            print(f"{t['id']}  {t['role']:9}  {state:7}  {t['name']}")
    else:
        print(f"revoked {body['id']} ({body['name']})")
    return 0


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
