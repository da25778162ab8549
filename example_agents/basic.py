"""Three agents that show the contract: echo returns what it got, sleep waits, fail always fails."""

import asyncio

from switchboard import Agent, TaskError
from switchboard.settings import Settings


async def echo(task):
    return {"payload": task.payload, "inputs": task.inputs}


async def sleep(task):
    seconds = float(task.payload.get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


async def fail(task):
    raise TaskError(task.payload.get("message", "this agent always fails"),
                    retryable=bool(task.payload.get("retryable", True)))


def build(settings: Settings | None = None) -> list[Agent]:
    agents = []
    for name, capability, handler in (("echo-agent", "echo", echo), ("sleep-agent", "sleep", sleep),
                                      ("fail-agent", "fail", fail)):
        agent = Agent(name, settings=settings)
        agent.handler(capability)(handler)
        agents.append(agent)
    return agents
