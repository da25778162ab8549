"""The agent of the chaos scenario for what agents do while they run (test_chaos.py, scenario 7):

    python -m tests.chaos.feature_agent --log FILE

Its "feature" handler streams TOKENS tokens (checkpointing every 20), asks a question, publishes
"feature.done" with the answer and returns it. It also subscribes to "feature.*" and appends each event
it hears to FILE as a JSON line {"heard": id, "topic"}, written whole, so the line survives a SIGKILL.
"""

from __future__ import annotations

import argparse
import asyncio
import os

import orjson

from switchboard import Agent

TOKENS = 200


def token(i: int) -> str:
    return f"t{i} "


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--log", required=True)
    args = parser.parse_args()
    agent = Agent("feature-agent")
    fd = os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    @agent.handler("feature")
    async def feature(task):
        for i in range((task.checkpoint_state or {}).get("streamed", 0), TOKENS):
            await task.stream(token(i))
            if i % 20 == 19:
                await task.checkpoint({"streamed": i + 1})
            await asyncio.sleep(0.01)  # a model's pace, so the kills land mid-stream
        answer = await task.ask("Go on?", schema={"type": "string"})
        await task.publish("feature.done", {"answer": answer})
        return {"answer": answer}

    @agent.on_event("feature.*")
    async def heard(event):
        os.write(fd, orjson.dumps({"heard": event.id, "topic": event.topic}) + b"\n")

    agent.run()


if __name__ == "__main__":
    main()
