"""The REST contract's refusals: every bad request gets a 4xx JSON error and changes nothing."""

from __future__ import annotations

import asyncio
import http.client
import json
import urllib.error
import urllib.request

import aio_pika
import pytest

from tests.harness import Platform

VALID = {"tasks": [{"id": "a", "capability": "echo"}]}


@pytest.fixture
async def api_only(settings):
    # No coordinator: whatever the api publishes stays in the coordinator's queue, where we count it.
    platform = Platform(settings.model_copy(update={"max_payload_bytes": 1000, "api_token": "s3cret"}))
    platform.client.headers["Authorization"] = "Bearer s3cret"
    try:
        await platform.start(services=("api",))
        yield platform
    finally:
        await platform.close()


async def published(platform, queue: str | None = None) -> int:
    """Messages waiting in a queue; by default in the coordinator's and the dispatcher's together."""
    connection = await aio_pika.connect(platform.settings.amqp_url)
    try:
        channel = await connection.channel()
        names = [queue] if queue else [platform.topology.coordinator, platform.topology.dispatch]
        return sum([(await channel.declare_queue(name, passive=True)).declaration_result.message_count
                    for name in names])
    finally:
        await connection.close()

BAD_WORKFLOWS = [
    ({"tasks": [{"id": "a", "capability": "echo", "depends_on": ["ghost"]}]}, 422, "unknown_dependency", "ghost"),
    ({"tasks": [{"id": "a", "capability": "echo", "depends_on": ["b"]},
                {"id": "b", "capability": "echo", "depends_on": ["c"]},
                {"id": "c", "capability": "echo", "depends_on": ["a"]}]}, 422, "dependency_cycle", "a -> b -> c -> a"),
    ({"tasks": [{"id": "a", "capability": "echo", "depends_on": ["a"]}]}, 422, "dependency_cycle", "itself"),
    ({"tasks": [{"id": "a", "capability": "echo"}, {"id": "a", "capability": "echo"}]}, 422, "duplicate_task_id", "'a'"),
    ({"tasks": []}, 422, "empty_workflow", "at least one task"),
    ({"tasks": [{"id": "a", "capability": "echo", "priority": "URGENT"}]}, 422, "invalid_request", "priority"),
    ({"tasks": [{"id": "a", "capability": "echo", "payload": {"blob": "x" * 2000}}]}, 413, "payload_too_large", "limit is 1000"),
    ({"tasks": [{"id": "a"}]}, 422, "invalid_request", "capability"),
    ({"tasks": [{"id": "a", "capability": "echo", "depends_on": "b"}]}, 422, "invalid_request", "depends_on"),
    ({"tasks": [{"id": "a", "capability": "echo", "max_attempts": 0}]}, 422, "invalid_request", "max_attempts"),
    ({"tasks": [{"id": "a", "capability": "echo", "timeout_s": -1}]}, 422, "invalid_request", "timeout_s"),
    ({"tasks": [{"id": "a", "capability": "echo", "colour": "red"}]}, 422, "invalid_request", "colour"),
    ({"workflow": []}, 422, "invalid_request", "tasks"),
    ({"tasks": [{"id": "a", "capability": "echo", "max_attempts": True}]}, 422, "invalid_request", "max_attempts"),
    ({"tasks": [{"id": "a", "capability": "echo", "payload": {"n": 2**70}}]}, 422, "invalid_payload", "64 bits"),
]


@pytest.mark.parametrize("body,status,code,mentions", BAD_WORKFLOWS, ids=[c for _, _, c, _ in BAD_WORKFLOWS])
async def test_invalid_workflows_are_refused_and_nothing_is_stored_or_published(api_only, body, status, code, mentions):
    response = await api_only.client.post("/v1/workflows", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert mentions in error["message"] + str(error.get("details", ""))
    assert (await api_only.client.get("/v1/workflows")).json()["workflows"] == []
    assert await published(api_only) == 0


async def test_malformed_json_and_wrong_content(api_only):
    for raw in (b"{not json", b"", b"[1, 2", b"\xff\xfe"):
        response = await api_only.client.post("/v1/workflows", content=raw,
                                              headers={"Content-Type": "application/json"})
        assert response.status_code in (400, 422), response.text
        assert response.json()["error"]["code"] in ("malformed_json", "invalid_request")
    response = await api_only.client.post("/v1/workflows", content=b"{" + b" " * 5_000_000 + b"}",
                                          headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert await published(api_only) == 0


async def test_a_valid_workflow_is_stored_and_announced_once(api_only):
    chain = {"tasks": [{"id": "a", "capability": "echo"}, {"id": "b", "capability": "echo", "depends_on": ["a"]}]}
    response = await api_only.client.post("/v1/workflows", json=chain)
    assert response.status_code == 202
    assert response.json()["status"] == "pending"
    assert await published(api_only, api_only.topology.coordinator) == 1
    assert await published(api_only, api_only.topology.dispatch) == 0
    listed = (await api_only.client.get("/v1/workflows", params={"status": "pending"})).json()
    assert [w["workflow_id"] for w in listed["workflows"]] == [response.json()["workflow_id"]]


async def test_a_workflow_that_waits_on_nothing_is_queued_by_the_api_once(api_only):
    # No coordinator and no dependency engine in the way: its task goes to dispatch from here.
    response = await api_only.client.post("/v1/workflows", json=VALID, headers={"Idempotency-Key": "k1"})
    assert response.status_code == 202 and response.json()["status"] == "running"
    again = await api_only.client.post("/v1/workflows", json=VALID, headers={"Idempotency-Key": "k1"})
    assert again.json()["workflow_id"] == response.json()["workflow_id"]
    assert await published(api_only, api_only.topology.dispatch) == 1
    assert await published(api_only, api_only.topology.coordinator) == 1  # the repeat is announced; intake skips it
    view = (await api_only.client.get(f"/v1/workflows/{response.json()['workflow_id']}")).json()
    assert view["status"] == "running" and view["tasks"][0]["status"] == "queued"


async def test_an_overlong_idempotency_key_is_refused(api_only):
    response = await api_only.client.post("/v1/workflows", json=VALID, headers={"Idempotency-Key": "k" * 257})
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "invalid_request"
    assert "idempotency-key" in response.json()["error"]["message"].lower()
    assert (await api_only.client.get("/v1/workflows")).json()["workflows"] == []
    assert await published(api_only) == 0


async def test_lookups_and_parameters(api_only):
    client = api_only.client
    missing = await client.get("/v1/workflows/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "workflow_not_found"
    assert (await client.post("/v1/workflows/nope/cancel")).status_code == 404
    assert (await client.get("/v1/workflows", params={"status": "weird"})).status_code == 422
    assert (await client.get("/v1/workflows/x", params={"wait": -1})).status_code == 422
    assert (await client.get("/v1/nothing-here")).json()["error"]["code"] == "not_found"
    assert (await client.get("/healthz")).json() == {"status": "ok"}
    assert (await client.get("/readyz")).status_code == 200
    assert "switchboard_" in (await client.get("/metrics")).text
    docs = (await client.get("/openapi.json")).json()
    assert "/v1/workflows" in docs["paths"] and "/v1/workflows/{workflow_id}/cancel" in docs["paths"]


async def test_listing_paginates_newest_first(api_only):
    ids = [(await api_only.client.post("/v1/workflows", json=VALID)).json()["workflow_id"] for _ in range(5)]
    page1 = (await api_only.client.get("/v1/workflows", params={"limit": 3})).json()
    page2 = (await api_only.client.get("/v1/workflows", params={"limit": 3, "after": page1["next"]})).json()
    assert [w["workflow_id"] for w in page1["workflows"] + page2["workflows"]] == ids[::-1]
    assert page2["next"] is None


async def test_long_poll_returns_at_the_deadline_for_an_unfinished_workflow(api_only):
    wf_id = (await api_only.client.post("/v1/workflows", json=VALID)).json()["workflow_id"]
    view = (await api_only.client.get(f"/v1/workflows/{wf_id}", params={"wait": 0.3})).json()
    assert view["status"] == "running"  # no agent in this test: it never finishes


async def test_a_single_task_follows_the_same_rules_as_a_workflows_task(api_only):
    for task, mentions in (({"capability": ""}, "capability"), ({"capability": "no spaces"}, "capability"),
                           ({"capability": "echo", "max_attempts": True}, "max_attempts"),
                           ({"capability": "echo", "depends_on": ["ghost"]}, "ghost")):
        response = await api_only.client.post("/v1/tasks", json=task)
        assert response.status_code == 422, response.text
        assert mentions in str(response.json()["error"])
    assert await published(api_only) == 0


def _urllib_post(url: str, body: bytes, token: str) -> tuple[int, dict]:
    # urllib sends the whole body before it reads the answer: the server must read it to be heard.
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json",
                                                              "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def _chunked_post(port: int, path: str, chunks: int, token: str) -> tuple[int, dict]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.request("POST", path, body=(b" " * 500_000 for _ in range(chunks)), encode_chunked=True,
                           headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


async def test_every_client_sees_the_413_of_a_body_over_the_limit(api_only):
    port, token = api_only.settings.api_port, api_only.settings.api_token
    status, body = await asyncio.to_thread(_urllib_post, f"http://127.0.0.1:{port}/v1/workflows",
                                           b'{"tasks": [' + b" " * 20_000_000 + b"]}", token)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    # Without a Content-Length (chunked), the limit holds as the body arrives.
    status, body = await asyncio.to_thread(_chunked_post, port, "/v1/workflows", 20, token)
    assert (status, body["error"]["code"]) == (413, "body_too_large")
    assert await published(api_only) == 0


async def test_an_undeclared_method_gets_405_with_the_paths_methods(api_only):
    for method, path, allowed in (("PUT", "/v1/workflows", "GET, POST"), ("PATCH", "/v1/dlq/abc", "DELETE, GET"),
                                  ("GET", "/v1/dlq/replay", None), ("OPTIONS", "/v1/dlq/replay", "POST"),
                                  ("DELETE", "/v1/workflows/batch", "POST")):
        response = await api_only.client.request(method, path)
        if allowed is None:  # a dead letter named "replay": there is none
            assert response.status_code == 404
            continue
        assert response.status_code == 405, (method, path, response.text)
        assert response.headers["allow"] == allowed and response.json()["error"]["code"] == "method_not_allowed"


async def test_the_openapi_document_names_every_answer(api_only):
    spec = (await api_only.client.get("/openapi.json")).json()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            answers = set(operation["responses"])
            assert "503" in answers, (method, path)
            if "requestBody" in operation:
                assert {"400", "413", "422"} <= answers, (method, path)
            if method != "get" and path.startswith("/v1/"):
                assert "401" in answers, (method, path)
            if "{" in path:
                assert "404" in answers, (method, path)
            for status, answer in operation["responses"].items():
                if status >= "400":
                    assert answer["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "text/plain" in spec["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
