"""The streaming benchmark's agent: "stream" calls task.stream() at a steady rate, each chunk carrying
its sequence number and send time, so that a reader of the workflow's event stream can time each one.

    python bench/stream_agent.py      # settings from SWITCHBOARD_* env vars; bench/run.py starts it

Payload: {"chunks": N, "rate_per_s": R, "start_at": unix time}. It waits for start_at, so the bench's
reader is connected before the first chunk, then sends chunk i at start_at + i/R (open loop: a late
chunk does not push back the ones after it). A chunk is "<i>,<time.time()>;".
"""

from __future__ import annotations

import asyncio
import time

from switchboard import Agent, runtime
from switchboard.settings import Settings, get_settings

NAME = "bench-stream-agent"


def build(settings: Settings | None = None) -> Agent:
    agent = Agent(NAME, settings=settings or get_settings())

    @agent.handler("stream")
    async def stream(task):
        n, rate = int(task.payload["chunks"]), float(task.payload.get("rate_per_s", 1000))
        start = float(task.payload.get("start_at", time.time()))
        late = 0
        for i in range(n):
            delay = start + i / rate - time.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -0.005:
                late += 1  # the agent itself fell behind: the bench reports it beside the latencies
            await task.stream(f"{i},{time.time():.6f};")
        return {"chunks": n, "late_sends": late, "ended_at": time.time()}

    return agent


if __name__ == "__main__":
    runtime.run(build())
