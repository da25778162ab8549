"""Agents for the hosting tests, built for `switchboard host tests.many_agents:build`:

MANY_AGENTS (default 10) agents named `<MANY_AGENTS_PREFIX>-<i>`, each serving "many" with concurrency 1.
A run sleeps the payload's `sleep_s` and returns the agent's name, so the tests count who did what.
"""

from __future__ import annotations

import asyncio
import os

from switchboard import Agent
from switchboard.settings import Settings

CAPABILITY = "many"


def make(name: str, settings: Settings | None = None) -> Agent:
    agent = Agent(name, settings=settings, concurrency=1)

    @agent.handler(CAPABILITY)
    async def many(task):
        await asyncio.sleep(task.payload.get("sleep_s", 0))
        return {"agent": name}

    return agent


def build(settings: Settings | None = None) -> list[Agent]:
    prefix = os.environ.get("MANY_AGENTS_PREFIX", "many")
    return [make(f"{prefix}-{i}", settings) for i in range(int(os.environ.get("MANY_AGENTS", "10")))]
