"""Three agents that show the contract: echo returns what it got, sleep waits, fail always fails."""

import asyncio

from switchboard import Agent, TaskError

echo_agent = Agent("echo-agent")
sleep_agent = Agent("sleep-agent")
fail_agent = Agent("fail-agent")


@echo_agent.handler("echo")
async def echo(task):
    return {"payload": task.payload, "inputs": task.inputs}


@sleep_agent.handler("sleep")
async def sleep(task):
    seconds = float(task.payload.get("seconds", 1))
    await asyncio.sleep(seconds)
    return {"slept": seconds}


@fail_agent.handler("fail")
async def fail(task):
    raise TaskError(task.payload.get("message", "this agent always fails"),
                    retryable=bool(task.payload.get("retryable", True)))
