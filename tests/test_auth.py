"""Tokens and roles on the REST API, and the audit log of what they did: against the real api, store,
broker and Redis."""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from switchboard.audit import AuditLog
from switchboard.state import pack
from tests.harness import Platform, wait_for

BOOTSTRAP = "bootstrap-s3cret"
WORKFLOW = {"tasks": [{"id": "a", "capability": "echo"}]}


@pytest.fixture
async def api(settings):
    platform = Platform(settings.model_copy(update={"api_token": BOOTSTRAP, "api_rate_per_s": 0}))
    platform.client.headers["Authorization"] = f"Bearer {BOOTSTRAP}"
    try:
        await platform.start(services=("api",))
        yield platform
    finally:
        await platform.close()


def as_token(platform: Platform, token: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.AsyncClient(base_url=str(platform.client.base_url), headers=headers, timeout=30)


async def make_token(platform: Platform, role: str, name: str | None = None, **extra) -> tuple[str, str]:
    made = await platform.client.post("/v1/tokens", json={"name": name or role, "role": role, **extra})
    assert made.status_code == 201, made.text
    return made.json()["id"], made.json()["token"]


async def test_every_v1_call_needs_a_token_while_auth_is_on_and_probes_stay_open(api):
    async with as_token(api, None) as anonymous, as_token(api, "sbt_nope_nope") as wrong:
        for client in (anonymous, wrong):
            for method, path in (("GET", "/v1/workflows"), ("GET", "/v1/agents"), ("GET", "/v1/dlq"),
                                 ("POST", "/v1/workflows"), ("GET", "/v1/control"), ("GET", "/v1/tokens")):
                response = await client.request(method, path, json=WORKFLOW if method == "POST" else None)
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"].startswith("Bearer")
                assert response.json()["error"]["code"] == "unauthorized"
        for path in ("/healthz", "/readyz", "/metrics"):
            assert (await anonymous.get(path)).status_code == 200, path
    assert (await api.client.get("/v1/workflows")).json()["workflows"] == []  # nothing was submitted


async def test_a_token_is_shown_once_stored_as_a_hash_and_listed_without_its_secret(api):
    token_id, token = await make_token(api, "reader", "dashboards")
    assert token.startswith("sbt_") and token_id in token and len(token) > 40
    listed = (await api.client.get("/v1/tokens")).json()["tokens"]
    assert [t["name"] for t in listed] == ["dashboards"] and "token" not in listed[0] and "digest" not in listed[0]
    stored = await api.services["api"].store.read(lambda tr: tr.get(pack(api.settings.namespace, "token", token_id)))
    assert token.encode() not in stored and token.split("_", 2)[2].encode() not in stored


async def test_each_role_may_do_what_it_says_and_no_more(api):
    tokens = {role: (await make_token(api, role))[1] for role in ("reader", "submitter", "operator", "admin")}
    calls = [("GET", "/v1/agents", None), ("GET", "/v1/dlq", None), ("GET", "/v1/control", None),
             ("POST", "/v1/workflows", WORKFLOW), ("POST", "/v1/control/pause", {"capability": "x"}),
             ("POST", "/v1/control/resume", {"capability": "x"}), ("GET", "/v1/tokens", None),
             ("GET", "/v1/audit", None), ("DELETE", "/v1/dlq/nope", None)]
    allowed = {
        "reader": {"/v1/agents", "/v1/dlq", "/v1/control"},
        "submitter": {"/v1/workflows"},
        "operator": {"/v1/agents", "/v1/dlq", "/v1/control", "/v1/workflows", "/v1/control/pause",
                     "/v1/control/resume", "/v1/dlq/nope"},
    }
    allowed["admin"] = allowed["operator"] | {"/v1/tokens", "/v1/audit"}
    for role, token in tokens.items():
        async with as_token(api, token) as client:
            for method, path, body in calls:
                response = await client.request(method, path, json=body)
                if path in allowed[role]:
                    assert response.status_code in (200, 202, 404), (role, path, response.text)  # 404: no such dead letter
                else:
                    assert response.status_code == 403, (role, path, response.text)
                    assert response.json()["error"]["code"] == "forbidden"


async def test_a_submitter_sees_and_cancels_only_its_own_workflows(api):
    _, alice = await make_token(api, "submitter", "alice")
    _, bob = await make_token(api, "submitter", "bob")
    async with as_token(api, alice) as a, as_token(api, bob) as b:
        mine = (await a.post("/v1/workflows", json=WORKFLOW)).json()["workflow_id"]
        theirs = (await b.post("/v1/workflows", json=WORKFLOW)).json()["workflow_id"]
        assert (await a.get(f"/v1/workflows/{mine}")).status_code == 200
        assert [w["workflow_id"] for w in (await a.get("/v1/workflows")).json()["workflows"]] == [mine]
        for response in (await a.get(f"/v1/workflows/{theirs}"), await a.post(f"/v1/workflows/{theirs}/cancel")):
            assert response.status_code == 404 and response.json()["error"]["code"] == "workflow_not_found"
        assert (await b.get(f"/v1/workflows/{theirs}")).json()["status"] != "cancelled"
        assert (await a.post(f"/v1/workflows/{mine}/cancel")).json()["status"] == "cancelled"
    everyone = {w["workflow_id"] for w in (await api.client.get("/v1/workflows")).json()["workflows"]}
    assert everyone == {mine, theirs}  # the admin sees both


async def test_a_revoked_or_expired_token_is_refused(api):
    token_id, token = await make_token(api, "reader")
    async with as_token(api, token) as client:
        assert (await client.get("/v1/agents")).status_code == 200
        revoked = await api.client.delete(f"/v1/tokens/{token_id}")
        assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None

        async def refused() -> bool:
            return (await client.get("/v1/agents")).status_code == 401

        await wait_for(refused, timeout=1.0, interval=0.05, what="the revoked token refused within a second")
    assert (await api.client.delete("/v1/tokens/nope")).status_code == 404
    _, short = await make_token(api, "reader", expires_in_s=0.2)
    async with as_token(api, short) as client:
        await wait_for(lambda: _status(client, "/v1/agents", 401), timeout=5, what="the expired token refused")


async def _status(client: httpx.AsyncClient, path: str, status: int) -> bool:
    return (await client.get(path)).status_code == status


async def test_a_token_over_its_rate_gets_429_with_retry_after(settings):
    platform = Platform(settings.model_copy(update={"api_token": BOOTSTRAP, "api_rate_per_s": 1, "api_rate_burst": 3}))
    platform.client.headers["Authorization"] = f"Bearer {BOOTSTRAP}"
    try:
        await platform.start(services=("api",))
        statuses = [(await platform.client.get("/v1/control")) for _ in range(5)]
        assert [r.status_code for r in statuses] == [200, 200, 200, 429, 429]
        assert int(statuses[-1].headers["retry-after"]) >= 1 and statuses[-1].json()["error"]["code"] == "rate_limited"
    finally:
        await platform.close()


async def test_mutations_and_refusals_are_audited_in_a_chain_that_verify_checks(api):
    token_id, token = await make_token(api, "reader", "auditor-test")
    async with as_token(api, token) as reader, as_token(api, None) as anonymous:
        assert (await reader.post("/v1/control/stop-all")).status_code == 403
        assert (await anonymous.get("/v1/agents")).status_code == 401
    assert (await api.client.post("/v1/control/stop-all")).status_code == 200
    assert (await api.client.delete("/v1/dlq/nope")).status_code == 404
    assert (await api.client.delete(f"/v1/tokens/{token_id}")).status_code == 200

    records = (await api.client.get("/v1/audit")).json()["records"]
    seen = [(r["action"], r["outcome"], r["actor"]["name"], r["role"]) for r in records]
    assert seen == [("token.create", "ok", "bootstrap", "admin"),
                    ("control.stop-all", "forbidden", "auditor-test", "reader"),
                    ("read", "unauthenticated", None, None),
                    ("control.stop-all", "ok", "bootstrap", "admin"),
                    ("dlq.delete", "dead_letter_not_found", "bootstrap", "admin"),
                    ("token.revoke", "ok", "bootstrap", "admin")]
    assert all(r["request_id"] and set(r) >= {"ts", "target", "trace_id", "prev", "hash"} for r in records)
    assert records[-1]["target"] == {"token_id": token_id}
    assert not any(BOOTSTRAP in orjson.dumps(r).decode() or token in orjson.dumps(r).decode() for r in records)
    only = (await api.client.get("/v1/audit", params={"action": "control.stop-all", "actor": "bootstrap"})).json()
    assert [r["seq"] for r in only["records"]] == [4]

    env = {"SWITCHBOARD_STORE_URL": api.settings.store_url, "SWITCHBOARD_NAMESPACE": api.settings.namespace}
    assert await _verify(env) == (0, "6 records, the chain holds")
    # Tamper with record 3 (a refusal someone would hide): verify names it.
    store = api.services["api"].store
    key = pack(api.settings.namespace, "audit", 3)

    def tamper(tr):
        record = orjson.loads(tr.get(key))
        record["outcome"] = "ok"
        tr.set(key, orjson.dumps(record))

    await store.transact(tamper)
    code, said = await _verify(env)
    assert code == 1 and "record 3 was changed" in said
    checked, broken = await AuditLog(store, api.settings.namespace).verify()
    assert (checked, broken) == (2, "record 3 was changed (its hash does not match its content)")


async def _verify(env: dict) -> tuple[int, str]:
    """`switchboard audit verify`, as an operator runs it beside the store."""
    run = await asyncio.create_subprocess_exec(
        str(Path(sys.executable).parent / "switchboard"), "audit", "verify", env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    output, _ = await asyncio.wait_for(run.communicate(), 60)
    return run.returncode, output.decode().strip()


async def test_the_cli_makes_lists_and_revokes_tokens_through_the_api(api):
    switchboard = str(Path(sys.executable).parent / "switchboard")
    env = {**os.environ, "SWITCHBOARD_API_URL": str(api.client.base_url), "SWITCHBOARD_TOKEN": BOOTSTRAP}

    async def run(*args: str) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(switchboard, "token", *args, env=env,
                                                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        output, _ = await asyncio.wait_for(proc.communicate(), 60)
        return proc.returncode, output.decode()

    code, made = await run("--output", "json", "create", "ci-bot", "--role", "submitter")
    assert code == 0, made
    made = orjson.loads(made)
    async with as_token(api, made["token"]) as bot:
        assert (await bot.post("/v1/workflows", json=WORKFLOW)).status_code == 202
    code, listed = await run("list")
    assert code == 0 and made["id"] in listed and "active" in listed and made["token"] not in listed
    code, said = await run("revoke", made["id"])
    assert code == 0 and "revoked" in said
    code, said = await run("revoke", "nope")
    assert code == 1 and "no token" in said


async def test_only_a_token_that_may_act_on_the_workflow_answers_its_question_and_it_is_audited(settings):
    from switchboard import Agent

    platform = Platform(settings.model_copy(update={"api_token": BOOTSTRAP, "api_rate_per_s": 0}))
    platform.client.headers["Authorization"] = f"Bearer {BOOTSTRAP}"
    try:
        await platform.start()
        agent = Agent("asker", settings=platform.settings)

        @agent.handler("ask")
        async def ask(task):
            return await task.ask("ok?")

        await platform.add_agent(agent)
        tokens = {role: await make_token(platform, role, f"{role}-answers") for role in ("reader", "submitter")}
        _, other = await make_token(platform, "submitter", "another-submitter")
        async with as_token(platform, tokens["submitter"][1]) as owner, as_token(platform, other) as stranger, \
                as_token(platform, tokens["reader"][1]) as reader:
            response = await owner.post("/v1/workflows", json={"tasks": [{"id": "q", "capability": "ask"}]})
            wf_id = response.json()["workflow_id"]

            async def waiting():
                view = (await owner.get(f"/v1/workflows/{wf_id}")).json()
                return view["tasks"][0]["status"] == "waiting_input"

            await wait_for(waiting, what="the question asked")
            url = f"/v1/workflows/{wf_id}/tasks/q/input"
            assert (await reader.post(url, json={"answer": 1})).status_code == 403
            assert (await stranger.post(url, json={"answer": 1})).status_code == 404  # not its own: absent
            assert (await owner.post(url, json={"answer": "yes"})).status_code == 200
        view = await platform.wait(wf_id)
        assert view["status"] == "succeeded" and view["tasks"][0]["result"] == "yes"
        records = (await platform.client.get("/v1/audit", params={"action": "task.input"})).json()["records"]
        assert [(r["actor"]["name"], r["outcome"]) for r in records] == [
            ("reader-answers", "forbidden"), ("another-submitter", "workflow_not_found"), ("submitter-answers", "ok")]
        assert records[-1]["target"] == {"workflow_id": wf_id, "task_id": "q"}
    finally:
        await platform.close()
