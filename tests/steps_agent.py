"""An agent process for the checkpoint kill test:

    python -m tests.steps_agent --name N --log FILE [--stop-after K]

Its "steps" handler runs steps 1..10, resuming after the step its checkpoint names, and checkpoints after
each. Before checkpointing a step it appends {"agent", "step", "attempt"} to FILE (one write, flushed, so
the line survives a SIGKILL). With --stop-after K it waits forever once step K is checkpointed, for the
test to kill it. Every other setting comes from the SWITCHBOARD_* environment.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

import orjson

from switchboard import Agent
from switchboard.settings import Settings


async def spawn(settings: Settings, name: str, log: str, *extra: str, amqp_url: str | None = None):
    """Starts this agent as a process of its own, on the settings' platform (with `amqp_url`: as its own
    broker user)."""
    from tests.harness import free_port

    env = {**os.environ, "SWITCHBOARD_AMQP_URL": amqp_url or settings.amqp_url,
           "SWITCHBOARD_REDIS_URL": settings.redis_url, "SWITCHBOARD_STORE_URL": settings.store_url,
           "SWITCHBOARD_NAMESPACE": settings.namespace, "SWITCHBOARD_HEARTBEAT_INTERVAL_S": "0.2",
           "SWITCHBOARD_HEALTH_PORT": str(free_port())}
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.steps_agent", "--name", name, "--log", log, *extra, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)


def ran(log: str) -> list[tuple[str, int]]:
    """(agent, step) of each step run, in order."""
    with open(log, "rb") as f:
        return [(e["agent"], e["step"]) for e in map(orjson.loads, f.read().splitlines()) if "step" in e]


def stopped(log: str, step: int) -> bool:
    with open(log, "rb") as f:
        return any(orjson.loads(line).get("stopped") == step for line in f.read().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--stop-after", type=int, default=None)
    args = parser.parse_args()
    agent = Agent(args.name)
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @agent.handler("steps")
    async def steps(task):
        start = (task.checkpoint_state or {}).get("done", 0)
        for step in range(start + 1, 11):
            os.write(fd, orjson.dumps({"agent": args.name, "step": step, "attempt": task.attempt}) + b"\n")
            await task.checkpoint({"done": step})
            if step == args.stop_after:
                os.write(fd, orjson.dumps({"agent": args.name, "stopped": step}) + b"\n")
                await asyncio.Event().wait()
        return {"resumed_after": start, "agent": args.name}

    agent.run()


if __name__ == "__main__":
    main()
