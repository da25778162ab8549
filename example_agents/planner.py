"""A planner that delegates: it splits a goal into research steps, runs them in parallel on other
agents as a child workflow, then has a writer step combine them, and returns the outcome."""

from switchboard import Agent, TaskError
from switchboard.settings import Settings


async def plan(task):
    goal = task.payload.get("goal", "an answer")
    steps = task.payload.get("steps") or ["gather facts", "find counterpoints"]
    research = [{"id": f"research-{i}", "capability": "echo", "payload": {"step": step, "goal": goal}}
                for i, step in enumerate(steps)]
    write = {"id": "write", "capability": "echo", "payload": {"goal": goal, "format": "summary"},
             "depends_on": [r["id"] for r in research]}
    child = await task.run_workflow(research + [write], name=f"plan: {goal}")
    if child["status"] != "succeeded":
        raise TaskError(f"child workflow {child['workflow_id']} {child['status']}: {child.get('error')}")
    # One more hop, the single-task shorthand: have the sleep agent pause briefly before the answer.
    await task.delegate("sleep", {"seconds": 0.1})
    written = child["result"]["write"]
    return {"goal": goal, "child_workflow": child["workflow_id"],
            "research": {k: v["payload"]["step"] for k, v in written["inputs"].items()}}


def build(settings: Settings | None = None) -> list[Agent]:
    agent = Agent("planner-agent", settings=settings)
    agent.handler("plan")(plan)
    return [agent]
