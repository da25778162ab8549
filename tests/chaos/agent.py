"""A chaos agent, run as a process of its own:

    python -m tests.chaos.agent --name N --log FILE [--flaky 0.3] [--capability work] [--seed S]

Its handler appends JSON lines to FILE, each flushed before the handler goes on, so the log survives a
SIGKILL: {"event": "start"|"end"|"fail", "wf", "task", "attempt", "run", "t", "agent", "inputs",
"input_runs"}. `run` is a fresh uuid per run of a task; the handler returns {"run": run}, so the result
the platform records names the run that produced it. `inputs` are the parent ids the task received and
`input_runs` the run each parent's result names. With --flaky p, a run fails with probability p (a
retryable TaskError, logged as "fail") before doing any work. Every other setting comes from the
SWITCHBOARD_* environment, as for any agent.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time
import uuid

import orjson

from switchboard import Agent, TaskError


class RunLog:
    def __init__(self, path: str):
        # O_APPEND: each line is one write(2), whole, even with other writers on the same file.
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, **event) -> None:
        os.write(self.fd, orjson.dumps(event) + b"\n")


def build(name: str, log_path: str, *, capability: str = "work", flaky: float = 0.0, seed: int | None = None,
          min_ms: float = 5.0, max_ms: float = 30.0) -> Agent:
    agent = Agent(name)
    rng = random.Random(seed)
    log = RunLog(log_path)

    @agent.handler(capability)
    async def work(task):
        run = uuid.uuid4().hex
        inputs = task.inputs or {}
        common = dict(wf=task.workflow_id, task=task.task_id, attempt=task.attempt, run=run, agent=name,
                      inputs=sorted(inputs),
                      input_runs={p: (r or {}).get("run") if isinstance(r, dict) else None
                                  for p, r in inputs.items()})
        log.write(event="start", t=time.time(), **common)
        if flaky and rng.random() < flaky:
            log.write(event="fail", t=time.time(), **common)
            raise TaskError("injected")
        await asyncio.sleep(rng.uniform(min_ms, max_ms) / 1000)
        log.write(event="end", t=time.time(), **common)
        return {"run": run}

    return agent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--log", required=True)
    parser.add_argument("--capability", default="work")
    parser.add_argument("--flaky", type=float, default=0.0, help="probability that a run fails")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--min-ms", type=float, default=5.0)
    parser.add_argument("--max-ms", type=float, default=30.0)
    args = parser.parse_args()
    build(args.name, args.log, capability=args.capability, flaky=args.flaky, seed=args.seed,
          min_ms=args.min_ms, max_ms=args.max_ms).run()


if __name__ == "__main__":
    main()
