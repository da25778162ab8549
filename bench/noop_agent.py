"""The benchmark's agent: "noop" returns None, "stamp" returns when its handler started.

    python bench/noop_agent.py        # settings from SWITCHBOARD_* env vars (namespace, concurrency, ...)

bench/run.py starts it as its own process next to the six services.
"""

from __future__ import annotations

import time

from switchboard import Agent, runtime
from switchboard.settings import Settings, get_settings

NAME = "bench-agent"


def build(settings: Settings | None = None) -> Agent:
    agent = Agent(NAME, settings=settings or get_settings())

    @agent.handler("noop")
    async def noop(task):
        return None

    @agent.handler("stamp")
    async def stamp(task):
        return {"started": time.time()}

    return agent


if __name__ == "__main__":
    runtime.run(build())
