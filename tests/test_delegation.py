"""Agents delegate to agents: a planner runs a child workflow and a single delegated task, awaits
them without blocking its loop, and the children are linked to its task in the API."""

from __future__ import annotations

import asyncio

import example_agents
from switchboard import Agent


async def test_planner_delegates_and_children_are_linked(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)
    wf_id = await platform.submit({"tasks": [
        {"id": "plan", "capability": "plan", "payload": {"goal": "g", "steps": ["s1", "s2", "s3"]}},
        {"id": "after", "capability": "echo", "depends_on": ["plan"]},
    ]})
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    plan = next(t for t in view["tasks"] if t["id"] == "plan")["result"]
    assert plan["research"] == {"research-0": "s1", "research-1": "s2", "research-2": "s3"}
    listed = (await platform.client.get("/v1/workflows")).json()["workflows"]
    children = [w for w in listed if (w["parent"] or {}).get("workflow_id") == wf_id]
    assert len(children) == 2 and all(c["parent"]["task_id"] == "plan" for c in children)
    child = (await platform.client.get(f"/v1/workflows/{plan['child_workflow']}")).json()
    assert child["status"] == "succeeded" and len(child["tasks"]) == 4
    assert child["parent"] == {"workflow_id": wf_id, "task_id": "plan"}


async def test_many_delegating_handlers_wait_concurrently(platform):
    # Eight parents on one agent with concurrency 8, each awaiting a child: none blocks the others.
    gate = asyncio.Event()
    arrived = []

    async def child(task):
        arrived.append(task.payload["n"])
        if len(arrived) == 8:
            gate.set()
        await asyncio.wait_for(gate.wait(), 30)  # every child is running at once, or this times out
        return task.payload["n"] * 10

    async def parent(task):
        return await task.delegate("child", {"n": task.payload["n"]})

    parents = Agent("parents", settings=platform.settings, concurrency=8)
    parents.handler("parent")(parent)
    children = Agent("children", settings=platform.settings, concurrency=8)
    children.handler("child")(child)
    await platform.add_agent(parents)
    await platform.add_agent(children)
    wf_id = await platform.submit({"tasks": [{"id": f"p{n}", "capability": "parent", "payload": {"n": n}}
                                             for n in range(8)]})
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded"
    assert {t["id"]: t["result"] for t in view["tasks"]} == {f"p{n}": n * 10 for n in range(8)}


async def test_a_failed_child_fails_the_delegating_task(platform):
    for agent in example_agents.build(platform.settings):
        await platform.add_agent(agent)
    outer = Agent("outer", settings=platform.settings)

    @outer.handler("outer")
    async def run(task):
        return await task.delegate("fail", {"retryable": False})

    await platform.add_agent(outer)
    view = await platform.wait(await platform.submit(
        {"tasks": [{"id": "o", "capability": "outer", "max_attempts": 1}]}))
    assert view["status"] == "failed"
    assert "delegated 'fail' failed" in view["tasks"][0]["error"]["message"]
