"""The event stream (`GET /v1/events`, server-sent events) against the real platform: what services commit
reaches connected clients, filtered by workflow when asked, and a client that falls behind is cut off."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

import example_agents
from tests.sse import Reader
from tests.harness import Platform, wait_for

FAN_OUT = {"name": "fan", "tasks": [
    {"id": "a", "capability": "echo"},
    *({"id": f"b{i}", "capability": "echo", "depends_on": ["a"]} for i in range(3)),
    {"id": "c", "capability": "echo", "depends_on": ["b0", "b1", "b2"]},
]}
ORDER = {"pending": 0, "queued": 1, "running": 2, "succeeded": 3}


async def start_examples(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)


async def test_fan_out_tasks_and_workflow_reach_the_stream_in_order(platform):
    await start_examples(platform)
    async with Reader(platform.client) as everything:
        other = await platform.submit({"tasks": [{"id": "x", "capability": "echo"}]})
        wf_id = await platform.submit(FAN_OUT)
        async with Reader(platform.client, params={"workflow_id": wf_id}) as only:
            await wait_for(lambda: everything.of("workflow", workflow_id=wf_id, status="succeeded"),
                           timeout=15, what="the workflow's success on the stream")
        ids = [i for i, _, _ in everything.events]
        assert ids == sorted(ids) and len(set(ids)) == len(ids)
        for task_id in ("a", "b0", "b1", "b2", "c"):
            seen = [d for d in everything.of("task", workflow_id=wf_id, task_id=task_id)]
            statuses = [d["status"] for d in seen]
            assert statuses[-1] == "succeeded", (task_id, statuses)
            # Never backwards, whatever order two publishers' messages took: by commit time.
            by_time = [d["status"] for d in sorted(seen, key=lambda d: d["at"])]
            assert [ORDER[s] for s in by_time] == sorted(ORDER[s] for s in by_time), (task_id, by_time)
            assert seen[-1]["attempt"] == 1 and seen[-1]["ran_on"] and seen[-1]["finished_at"]
        assert everything.of("task", workflow_id=wf_id, task_id="b0", status="queued")
        assert [d["status"] for d in everything.of("workflow", workflow_id=wf_id)][-1] == "succeeded"
        await wait_for(lambda: everything.of("workflow", workflow_id=other, status="succeeded"), timeout=10,
                       what="the other workflow's success")
        # The filtered stream opened late (after the workflow started) but sees its end, and nothing else.
        assert only.of("workflow", workflow_id=wf_id, status="succeeded") or only.of("task", workflow_id=wf_id)
        assert all(d.get("workflow_id") == wf_id for _, _, d in only.events)


async def test_child_workflows_are_in_their_parents_filtered_stream(platform):
    await start_examples(platform)
    spec = {"tasks": [{"id": "plan", "capability": "plan", "payload": {"goal": "g"}}]}
    async with Reader(platform.client) as everything:
        wf_id = await platform.submit(spec)
        async with Reader(platform.client, params={"workflow_id": wf_id}) as family:
            view = await platform.wait(wf_id, timeout=30)
            assert view["status"] == "succeeded", view
            children = {d["workflow_id"] for d in everything.of("workflow")
                        if (d.get("parent") or {}).get("workflow_id") == wf_id}
            if not children:
                pytest.skip("the planner made no child workflow")
            await wait_for(lambda: any(d["workflow_id"] in children for d in family.of("task")), timeout=10,
                           what="a child's task events in the parent's stream")


async def test_controls_and_dead_letters_are_events(platform):
    await start_examples(platform)
    async with Reader(platform.client) as stream:
        assert (await platform.client.post("/v1/control/stop-all")).status_code == 200
        await wait_for(lambda: stream.of("control", stopped=True), timeout=10, what="the stop-all event")
        assert (await platform.client.post("/v1/control/resume")).status_code == 200
        await wait_for(lambda: stream.of("control", stopped=False), timeout=10, what="the resume event")
        wf_id = await platform.submit({"tasks": [{"id": "f", "capability": "fail", "max_attempts": 1,
                                                  "payload": {"retryable": False}}]})
        await wait_for(lambda: stream.of("workflow", workflow_id=wf_id, status="failed"), timeout=15,
                       what="the workflow's failure")
        assert stream.of("dlq", workflow_id=wf_id, change="added")  # the same transaction, the same message
        failed = stream.of("task", workflow_id=wf_id, task_id="f", status="failed")
        assert failed and failed[-1]["error"]["message"]
        # Agents: registered when they first beat (before this stream opened), stopped when they stop.
        agent = platform.agents[0]
        await platform.stop_agent(agent)
        await wait_for(lambda: stream.of("agents", name=agent.name, change="stopped"), timeout=10,
                       what="the stopped agent's event")


async def test_a_client_that_falls_behind_is_cut_off_and_the_others_keep_receiving(platform):
    await start_examples(platform)
    hub = platform.services["api"].events
    async with Reader(platform.client) as reading:
        hub.client_queue = 5  # for the next client only: the real bound is 1000; this one a few events fill
        stuck = hub.subscribe()  # subscribed like a stream whose client never reads: nothing drains it
        assert stuck is not None
        first = await platform.submit(FAN_OUT)
        await wait_for(lambda: stuck.cut.is_set(), timeout=10, what="the stuck client cut off")
        assert stuck not in hub.clients and hub.cut_off >= 1 and stuck.queue.qsize() == 5
        second = await platform.submit(FAN_OUT)
        for wf_id in (first, second):
            await wait_for(lambda wf_id=wf_id: reading.of("workflow", workflow_id=wf_id, status="succeeded"),
                           timeout=10, what="the reading client's events")
        # The reading client, cut off too, sees its stream end (an EventSource would reconnect).
        [mine] = [c for c in hub.clients]
        while mine.offer(b": filler\n\n"):
            pass
        await asyncio.wait_for(reading.ended.wait(), 5)
        assert mine not in hub.clients


async def test_a_client_whose_socket_is_full_is_cut_off_and_its_connection_ends(platform):
    """End to end: a client that never reads. Its kernel buffers fill first (kept small here), then the
    server's send blocks, then its queue fills; it is cut off and the server ends its response."""
    await start_examples(platform)
    hub = platform.services["api"].events
    hub.client_queue = 50
    loop = asyncio.get_running_loop()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    stuck.setblocking(False)
    await loop.sock_connect(stuck, ("127.0.0.1", platform.settings.api_port))
    await loop.sock_sendall(stuck, b"GET /v1/events HTTP/1.1\r\nHost: test\r\n\r\n")
    try:
        await wait_for(lambda: hub.clients, timeout=5, what="the stuck client subscribed")
        hub.client_queue = 1000
        async with Reader(platform.client) as reading:
            spec = {"tasks": [{"id": f"t{i}", "capability": "echo"} for i in range(200)]}
            deadline = time.monotonic() + 15
            while hub.cut_off == 0:
                assert time.monotonic() < deadline, f"not cut off after {hub.sequence} events"
                wf_id = await platform.submit(spec)
                await platform.wait(wf_id)
            # The reading client was not held back, and keeps receiving.
            await wait_for(lambda: reading.of("workflow", workflow_id=wf_id, status="succeeded"), timeout=10,
                           what="the reading client's events")
            assert len(hub.clients) == 1
        # Once the stuck client reads what its buffers hold, its response has ended.
        async with asyncio.timeout(10):
            while await loop.sock_recv(stuck, 1 << 20):
                pass
    finally:
        stuck.close()


async def test_with_auth_the_token_may_come_as_a_query_parameter(settings):
    platform = Platform(settings.model_copy(update={"api_token": "events-token"}))
    try:
        await platform.start(services=("api",))
        assert (await platform.client.get("/v1/events")).status_code == 401
        assert (await platform.client.get("/v1/events", params={"access_token": "wrong"})).status_code == 401
        bearer = {"Authorization": "Bearer events-token"}
        async with Reader(platform.client, params={"access_token": "events-token"}) as stream:
            assert stream.status == 200
            assert (await platform.client.post("/v1/control/pause", headers=bearer)).status_code == 200
            await wait_for(lambda: stream.of("control", paused=True), timeout=10, what="the pause event")
        me = (await platform.client.get("/v1/whoami", headers=bearer)).json()
        assert me["role"] == "admin" and "control" in me["permissions"]
        made = (await platform.client.post("/v1/tokens", headers=bearer, json={"name": "r", "role": "reader"})).json()
        reader = (await platform.client.get("/v1/whoami", headers={"Authorization": f"Bearer {made['token']}"})).json()
        assert reader == {"id": made["id"], "name": "r", "role": "reader", "permissions": ["read"]}
        assert (await platform.client.get("/v1/whoami")).status_code == 401
        doc = (await platform.client.get("/openapi.json")).json()["paths"]["/v1/events"]["get"]
        assert "text/event-stream" in doc["responses"]["200"]["content"]
        assert {p["name"] for p in doc["parameters"]} == {"workflow_id", "access_token"}
        # Only the stream takes the token in the query string; and no record of the calls holds it.
        assert (await platform.client.get("/v1/control", params={"access_token": "events-token"})).status_code == 401
        audit = (await platform.client.get("/v1/audit", headers=bearer)).text
        assert "events-token" not in audit and "wrong" not in audit and "access_token" not in audit
    finally:
        await platform.close()

