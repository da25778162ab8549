"""What handlers spend and what workflows may spend (switchboard.usage): usage reported by handlers is
shown per task and workflow and counted in metrics, exactly once; crossing a budget (a child's spending
included) stops the workflow as budget_exceeded."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import REGISTRY, generate_latest

from switchboard import Agent, TaskError, telemetry
from switchboard.protocol import Envelope, MessageType, WorkflowSpec
from switchboard.state import open_store
from switchboard.telemetry import Recorder
from switchboard.workflows import TERMINAL_WORKFLOW, WorkflowStore
from tests.harness import wait_for

ENDED = tuple(TERMINAL_WORKFLOW)


@pytest.fixture
def recorder():
    plugin = telemetry.install(Recorder())
    yield plugin
    telemetry.uninstall(plugin)


def task(view: dict, task_id: str) -> dict:
    return next(t for t in view["tasks"] if t["id"] == task_id)


async def add_agent(platform, name: str, handlers: dict, concurrency: int = 4) -> Agent:
    agent = Agent(name, settings=platform.settings, concurrency=concurrency)
    for capability, handler in handlers.items():
        agent.handler(capability)(handler)
    return await platform.add_agent(agent)


async def test_usage_is_shown_per_task_and_workflow_and_counted_in_metrics(platform, recorder):
    async def spend(task):
        if task.attempt == 1:
            await task.report_usage(tokens=3)  # an attempt that fails still spent it
            raise TaskError("first attempt fails")
        await task.report_usage(tokens=10, cost=0.25)
        await task.report_usage(tokens=10, cost=0.25)
        return "spent"

    async def plan(task):
        await task.report_usage(tokens=5)
        return await task.delegate("research", {"topic": "x"})

    async def research(task):
        await task.report_usage(tokens=7, cost=0.1)
        return "notes"

    await add_agent(platform, "usage-agent", {"spend": spend, "plan": plan, "research": research})
    wf_id = await platform.submit({"budget": {"tokens": 1_000, "cost": 10.0}, "tasks": [
        {"id": "a", "capability": "spend", "retry": {"base_s": 0, "max_s": 0}},
        {"id": "b", "capability": "plan", "depends_on": ["a"]}]})
    view = await platform.wait(wf_id)
    assert view["status"] == "succeeded", view
    assert task(view, "a")["usage"] == {"tokens": 23, "cost": 0.5} and task(view, "a")["attempts"] == 2
    assert task(view, "b")["usage"] == {"tokens": 5, "cost": 0.0}  # its own; the child's is the child's
    assert view["usage"] == {"tokens": 35, "cost": 0.6}  # its tasks' and its child workflow's
    assert view["budget"] == {"tokens": 1_000, "cost": 10.0}
    [child_id] = await platform.services["api"].workflows.children(wf_id)
    child = (await platform.client.get(f"/v1/workflows/{child_id}")).json()
    assert child["usage"] == {"tokens": 7, "cost": 0.1} and child["budget"] is None

    def reported(capability):
        added = [e for e in recorder.named("usage.reported") if e["capability"] == capability]
        return sum(e["tokens"] for e in added), round(sum(e["cost"] for e in added), 9)

    await wait_for(lambda: reported("research") == (7, 0.1), what="the child's usage in the metrics")
    assert reported("spend") == (23, 0.5) and reported("plan") == (5, 0.0)
    text = generate_latest(REGISTRY).decode()
    assert 'switchboard_usage_tokens_total{capability="spend"}' in text
    assert 'switchboard_usage_cost_total{capability="research"}' in text


async def test_crossing_the_budget_cancels_running_tasks_and_starts_nothing_more(platform):
    waiting_runs, cancelled, started = asyncio.Event(), {}, []

    async def spend(task):
        await task.report_usage(tokens=60)
        await waiting_runs.wait()  # the other task runs, so that the crossing has one more to cancel
        await task.report_usage(tokens=60, cost=0.5)  # 120 of 100
        await hold(task)

    async def wait(task):
        started.append(task.task_id)
        if task.payload.get("quick"):
            return "quick"
        waiting_runs.set()
        await hold(task)

    async def hold(task):
        cancelled[task.task_id] = asyncio.Event()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled[task.task_id].set()
            raise

    await add_agent(platform, "spend-agent", {"spend": spend, "after": wait})
    await add_agent(platform, "wait-agent", {"wait": wait}, concurrency=1)  # one "wait" task waits behind the other
    wf_id = await platform.submit({"budget": {"tokens": 100}, "tasks": [
        {"id": "spend", "capability": "spend"},
        {"id": "w1", "capability": "wait"},
        {"id": "w2", "capability": "wait"},
        {"id": "after", "capability": "after", "depends_on": ["spend"]}]})
    view = await platform.wait(wf_id, until=ENDED)
    assert view["status"] == "budget_exceeded", view
    assert view["usage"] == {"tokens": 120, "cost": 0.5}
    assert view["error"] == "budget exceeded: tokens 120 (budget 100), cost 0.5"
    assert {t["id"]: t["status"] for t in view["tasks"]} == {
        "spend": "cancelled", "w1": "cancelled", "w2": "cancelled", "after": "cancelled"}
    assert task(view, "spend")["usage"] == {"tokens": 120, "cost": 0.5}
    running = started[0]
    queued = ({"w1", "w2"} - {running}).pop()
    assert task(view, queued)["attempts"] == 0
    for task_id in ("spend", running):  # their handlers see the cancellation
        await asyncio.wait_for(cancelled[task_id].wait(), 30)
    # The wait agent takes one task at a time: once a later one has run, the queued one's message was
    # taken and dropped; neither it nor "after" ever started.
    later = await platform.wait(await platform.submit({"tasks": [
        {"id": "later", "capability": "wait", "payload": {"quick": True}}]}))
    assert later["status"] == "succeeded"
    assert started == [running, "later"]


async def test_a_childs_usage_counts_against_its_parents_budget(platform):
    ended = {"plan": asyncio.Event(), "research": asyncio.Event()}

    async def plan(task):
        try:
            return await task.delegate("research", {})
        finally:  # cancelled, or told first that its child stopped (budget_exceeded)
            ended["plan"].set()

    async def research(task):
        await task.report_usage(tokens=80, cost=1.5)
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            ended["research"].set()
            raise

    await add_agent(platform, "family-agent", {"plan": plan, "research": research})
    wf_id = await platform.submit({"budget": {"cost": 1.0}, "tasks": [{"id": "plan", "capability": "plan"}]})
    view = await platform.wait(wf_id, until=ENDED)
    assert view["status"] == "budget_exceeded" and view["usage"] == {"tokens": 80, "cost": 1.5}
    assert view["error"] == "budget exceeded: tokens 80, cost 1.5 (budget 1)"
    [child_id] = await platform.services["api"].workflows.children(wf_id)
    child = await platform.wait(child_id, until=ENDED)
    assert child["status"] == "budget_exceeded" and child["usage"] == {"tokens": 80, "cost": 1.5}
    assert child["error"] == f"the budget of workflow {wf_id} was exceeded"
    assert task(child, "research")["status"] == "cancelled"
    assert task(view, "plan")["status"] == "cancelled"
    for event in ended.values():
        await asyncio.wait_for(event.wait(), 30)


@pytest.fixture
async def workflows(settings):
    """The store's rules alone, on a real store: no broker, no agents."""
    store = open_store(settings.store_url)
    yield WorkflowStore(store, settings)
    await store.close()


def usage_report(wf_id: str, attempt: int, tokens: int, cost: float, n: int, kind: str = "usage") -> Envelope:
    totals = {"tokens": tokens, "cost": cost, "n": n}
    if kind == "result":
        return Envelope(type=MessageType.RESULT, source="agent", workflow_id=wf_id, task_id="t", attempt=attempt,
                        payload={"result": "done", "usage": totals})
    return Envelope(type=MessageType.STATUS, subject="usage", source="agent", workflow_id=wf_id, task_id="t",
                    attempt=attempt, payload=totals)


async def test_a_redelivered_or_late_report_is_counted_once(workflows):
    [wf_id], _, _ = await workflows.create([WorkflowSpec(tasks=[{"id": "t", "capability": "c"}])])
    first = usage_report(wf_id, 1, 10, 0.5, n=1)
    await workflows.record([first])
    await workflows.record([first])  # redelivered
    await workflows.record([usage_report(wf_id, 1, 25, 0.75, n=3), usage_report(wf_id, 1, 15, 0.6, n=2)])
    view = await workflows.get(wf_id)
    assert view["usage"] == view["tasks"][0]["usage"] == {"tokens": 25, "cost": 0.75}  # n=2 came after n=3
    out = await workflows.record([usage_report(wf_id, 1, 30, 1.0, n=4, kind="result")])  # the final totals
    assert [(e["tokens"], e["cost"]) for name, e in out.events if name == "usage.reported"] == [(5, 0.25)]
    await workflows.record([usage_report(wf_id, 1, 30, 1.0, n=4, kind="result")])  # redelivered
    await workflows.record([usage_report(wf_id, 1, 40, 2.0, n=5)])  # after the outcome: too late
    view = await workflows.get(wf_id)
    assert view["status"] == "succeeded" and view["usage"] == {"tokens": 30, "cost": 1.0}
    with pytest.raises(ValueError, match="tokens"):  # the aggregator dead-letters it
        await workflows.record([usage_report(wf_id, 1, -1, 0.0, n=6)])


async def test_reaching_a_budget_is_not_crossing_it(workflows):
    spec = WorkflowSpec(budget={"tokens": 10}, tasks=[{"id": "t", "capability": "c"}])
    [wf_id], _, _ = await workflows.create([spec])
    await workflows.record([usage_report(wf_id, 1, 10, 0.0, n=1)])
    assert (await workflows.get(wf_id))["status"] == "running"
    out = await workflows.record([usage_report(wf_id, 1, 11, 0.0, n=2)])
    view = await workflows.get(wf_id)
    assert view["status"] == "budget_exceeded" and view["tasks"][0]["status"] == "cancelled"
    assert [(e.subject, e.workflow_id) for e in out.control] == [("cancel", wf_id)]  # the running handler's
    assert [e["status"] for name, e in out.events if name == "workflow.finished"] == ["budget_exceeded"]
