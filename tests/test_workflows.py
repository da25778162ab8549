"""Workflows end to end through the REST API, with real services, broker, Redis and store."""

from __future__ import annotations

import asyncio
import random
import time

import redis.asyncio as aioredis

import example_agents
from switchboard import Agent
from switchboard.protocol import Envelope, MessageType
from switchboard.registry import RegistryClient
from tests.harness import Platform, wait_for


async def start_examples(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)


async def test_fan_out_fan_in_results_flow_to_dependents(platform):
    await start_examples(platform)
    spec = {"name": "fan", "tasks": [
        {"id": "a", "capability": "echo", "payload": {"n": 1}},
        *({"id": f"b{i}", "capability": "echo", "payload": {"i": i}, "depends_on": ["a"]} for i in range(3)),
        {"id": "c", "capability": "echo", "depends_on": ["b0", "b1", "b2"]},
    ]}
    view = await platform.wait(await platform.submit(spec))
    assert view["status"] == "succeeded"
    tasks = {t["id"]: t for t in view["tasks"]}
    assert all(t["status"] == "succeeded" and t["attempts"] == 1 for t in tasks.values())
    c = tasks["c"]["result"]
    assert set(c["inputs"]) == {"b0", "b1", "b2"}
    assert c["inputs"]["b2"] == {"payload": {"i": 2}, "inputs": {"a": {"payload": {"n": 1}, "inputs": {}}}}
    assert view["result"] == {"c": c}  # the workflow's result: its leaves' results


async def test_big_payloads_and_results_on_a_store_with_limited_values(settings):
    """FoundationDB takes at most 100,000 bytes per value; the store chunks larger ones. The whole platform
    on SQLite with values limited to 10 kB: 200 kB payloads go in and 200 kB results flow to dependents."""
    platform = Platform(settings.model_copy(update={"store_url": settings.store_url + "?max_value_bytes=10000"}))
    try:
        await platform.start()
        await start_examples(platform)
        blob = "x" * 200_000
        spec = {"tasks": [{"id": "a", "capability": "echo", "payload": {"blob": blob}},
                          {"id": "b", "capability": "echo", "depends_on": ["a"]}]}
        view = await platform.wait(await platform.submit(spec))
        assert view["status"] == "succeeded", view
        assert view["result"]["b"]["inputs"]["a"]["payload"]["blob"] == blob
    finally:
        await platform.close()


async def test_random_dag_of_200_runs_each_task_once_after_its_parents(platform):
    rng = random.Random(7)
    parents = {f"t{i}": rng.sample([f"t{j}" for j in range(i)], k=min(i, rng.randint(0, 3))) for i in range(200)}
    finished: set[str] = set()
    runs: dict[str, int] = {}
    early: list[str] = []

    async def node(task):
        if not set(parents[task.task_id]) <= finished:
            early.append(task.task_id)
        runs[task.task_id] = runs.get(task.task_id, 0) + 1
        await asyncio.sleep(rng.random() / 1000)
        finished.add(task.task_id)
        return {"id": task.task_id, "parents": sorted(task.inputs)}

    for name in ("node-1", "node-2"):  # competing consumers of one capability
        agent = Agent(name, settings=platform.settings, concurrency=4)
        agent.handler("node")(node)
        await platform.add_agent(agent)
    spec = {"tasks": [{"id": t, "capability": "node", "depends_on": p} for t, p in parents.items()]}
    view = await platform.wait(await platform.submit(spec), timeout=120)
    assert view["status"] == "succeeded"
    assert early == []
    assert runs == {t: 1 for t in parents}
    for task in view["tasks"]:
        assert task["result"]["parents"] == sorted(parents[task["id"]])
    assert {t["ran_on"] for t in view["tasks"]} == {"node-1", "node-2"}


async def test_a_task_that_exhausts_its_attempts_fails_the_workflow_and_cancels_the_rest(platform):
    await start_examples(platform)
    spec = {"tasks": [
        {"id": "bad", "capability": "fail", "max_attempts": 2, "payload": {"message": "boom"},
         "retry": {"base_s": 0.01}},
        {"id": "after", "capability": "echo", "depends_on": ["bad"]},
        {"id": "slow", "capability": "sleep", "payload": {"seconds": 60}},
        {"id": "late", "capability": "echo", "depends_on": ["slow"]},
    ]}
    view = await platform.wait(await platform.submit(spec))
    tasks = {t["id"]: t for t in view["tasks"]}
    assert view["status"] == "failed"
    assert "bad" in view["error"] and "boom" in view["error"]
    assert tasks["bad"]["status"] == "failed" and tasks["bad"]["attempts"] == 2
    assert tasks["bad"]["error"]["message"] == "boom"
    assert tasks["after"]["status"] == "cancelled" and tasks["after"]["attempts"] == 0
    assert tasks["slow"]["status"] == "cancelled"  # was running: its handler is cancelled too
    assert tasks["late"]["status"] == "cancelled"
    assert [e["attempt"] for e in tasks["bad"]["errors"]] == [1, 2]


async def test_a_non_retryable_error_fails_at_once(platform):
    await start_examples(platform)
    spec = {"tasks": [{"id": "x", "capability": "fail", "max_attempts": 5, "payload": {"retryable": False}}]}
    view = await platform.wait(await platform.submit(spec))
    assert view["status"] == "failed"
    assert view["tasks"][0]["attempts"] == 1


async def test_single_task_endpoint(platform):
    await start_examples(platform)
    response = await platform.client.post("/v1/tasks", json={"capability": "echo", "payload": {"q": 1}})
    assert response.status_code == 202
    body = response.json()
    view = await platform.wait(body["workflow_id"])
    assert view["tasks"][0]["id"] == body["task_id"]
    assert view["tasks"][0]["result"] == {"payload": {"q": 1}, "inputs": {}}


async def test_idempotent_submit(platform):
    spec = {"tasks": [{"id": "a", "capability": "nobody-serves-this"}]}
    key = {"Idempotency-Key": "order-42"}
    first = await platform.submit(spec, headers=key)
    second = await platform.submit(spec, headers=key)
    assert first == second
    other = await platform.client.post("/v1/workflows", json={"tasks": [{"id": "b", "capability": "x"}]},
                                       headers=key)
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    listed = (await platform.client.get("/v1/workflows")).json()["workflows"]
    assert [w["workflow_id"] for w in listed] == [first]


async def test_a_result_delivered_twice_is_recorded_once(platform):
    # Nobody serves "manual": we play the agent, and deliver a's result twice as a redelivery would.
    wf_id = await platform.submit({"tasks": [{"id": "a", "capability": "manual"},
                                             {"id": "b", "capability": "manual"}]})
    await wait_for(lambda: _status(platform, wf_id, "a", "queued"), what="a queued")
    bus = platform.services["api"].bus  # publishing as an agent would

    def result(task_id, value):
        return Envelope(type=MessageType.RESULT, source="tester", workflow_id=wf_id, task_id=task_id, attempt=1,
                        payload={"result": value})

    await bus.publish(result("a", {"v": 1}), bus.topology.results)
    await bus.publish(result("a", {"v": 2}), bus.topology.results)
    await wait_for(lambda: _status(platform, wf_id, "a", "succeeded"), what="a succeeded")
    await bus.publish(result("a", {"v": 3}), bus.topology.results)
    # Had a duplicate counted, the workflow would now look finished with b still open.
    probe = await platform.submit({"tasks": [{"id": "p", "capability": "manual"}]})  # a marker behind them
    await wait_for(lambda: _status(platform, probe, "p", "queued"), what="marker queued")
    await bus.publish(Envelope(type=MessageType.RESULT, source="tester", workflow_id=probe, task_id="p",
                               attempt=1, payload={"result": None}), bus.topology.results)
    await platform.wait(probe)
    view = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()
    assert view["status"] == "running"
    a = next(t for t in view["tasks"] if t["id"] == "a")
    assert a["result"] == {"v": 1} and a["attempts"] == 1
    await bus.publish(result("b", {"v": "b"}), bus.topology.results)
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    assert view["result"] == {"a": {"v": 1}, "b": {"v": "b"}}


async def _status(platform, wf_id, task_id, status) -> bool:
    view = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()
    return next(t for t in view["tasks"] if t["id"] == task_id)["status"] == status


async def test_cancel_reaches_running_handlers(platform):
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def long(task):
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    agent = Agent("long-agent", settings=platform.settings)
    agent.handler("long")(long)
    await platform.add_agent(agent)
    wf_id = await platform.submit({"tasks": [{"id": "l", "capability": "long"},
                                             {"id": "next", "capability": "long", "depends_on": ["l"]}]})
    await asyncio.wait_for(started.wait(), 30)
    response = await platform.client.post(f"/v1/workflows/{wf_id}/cancel")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"
    await asyncio.wait_for(cancelled.wait(), 30)
    view = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()
    assert {t["status"] for t in view["tasks"]} == {"cancelled"}
    assert (await platform.client.post(f"/v1/workflows/{wf_id}/cancel")).json()["status"] == "cancelled"


async def test_a_task_waits_with_a_reason_until_an_agent_for_it_appears(platform):
    wf_id = await platform.submit({"tasks": [{"id": "w", "capability": "late-cap", "payload": {"k": 1}}]})

    async def reason_shown() -> bool:
        task = (await platform.client.get(f"/v1/workflows/{wf_id}")).json()["tasks"][0]
        return task["status"] == "queued" and "late-cap" in (task["reason"] or "")

    await wait_for(reason_shown, what="pending reason")
    agent = Agent("late-agent", settings=platform.settings)

    @agent.handler("late-cap")
    async def late(task):
        return task.payload

    await platform.add_agent(agent)
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    assert view["tasks"][0]["result"] == {"k": 1} and view["tasks"][0]["reason"] is None


async def test_an_agent_that_stops_heartbeating_is_marked_lost(platform):
    agent = Agent("quiet-agent", settings=platform.settings)
    agent.handler("quiet")(lambda task: None)
    await platform.add_agent(agent)
    agent._heartbeat.cancel()  # alive but silent, as a hung process would be

    async def lost() -> bool:
        agents = (await platform.client.get("/v1/agents")).json()["agents"]
        return any(a["name"] == "quiet-agent" and a["status"] == "lost" for a in agents)

    await wait_for(lost, what="agent marked lost")
    listed = next(a for a in (await platform.client.get("/v1/agents")).json()["agents"] if a["name"] == "quiet-agent")
    assert listed["capabilities"] == ["quiet"] and "last_heartbeat" in listed and "in_flight" in listed



async def test_a_replica_that_stops_leaves_its_agent_to_the_other_replicas(settings):
    # Two replicas of one agent (two pods of one Deployment) heartbeat under one name; the registry
    # keeps the latest heartbeat's record.
    redis = aioredis.from_url(settings.redis_url)
    registry = RegistryClient(redis, settings)
    try:
        for pid in (1, 2):
            await registry.upsert({"name": "twin-agent", "capabilities": ["twin"], "host": "pod", "pid": pid,
                                   "status": "alive", "last_heartbeat": time.time()})
        await registry.remove("twin-agent", instance=("pod", 1))  # the replica that beat first stops
        assert await registry.live_agents() == {"twin-agent"}
        await registry.remove("twin-agent", instance=("pod", 2))  # then the last one
        assert await registry.agents() == []
    finally:
        await redis.delete(registry.key)
        await redis.aclose()
