"""Agent discovery on Redis: who is alive, what they serve, how loaded they are.

The registry service is the only writer (it consumes agents' heartbeats); the dispatcher and the api
read. An agent is live while its last heartbeat is younger than `agent_lost_after_s`; readers judge
that themselves, so a stalled registry cannot make a dead agent look alive.
"""

from __future__ import annotations

import time

import orjson
import redis.asyncio as aioredis

from switchboard.settings import Settings


class RegistryClient:
    def __init__(self, redis: aioredis.Redis, settings: Settings):
        self.redis = redis
        self.key = f"{settings.namespace}:agents"
        self.lost_after_s = settings.agent_lost_after_s

    async def upsert(self, agent: dict) -> None:
        await self.redis.hset(self.key, agent["name"], orjson.dumps(agent))

    async def remove(self, name: str, *, instance: tuple | None = None) -> None:
        """Forgets an agent; with `instance` (host, pid), only if its latest heartbeat came from there.

        Replicas of one agent (pods of a Deployment, `--scale`) share its name and queues: one replica
        that stops must not take the name from the others."""
        if instance is not None:
            raw = await self.redis.hget(self.key, name)
            latest = orjson.loads(raw) if raw is not None else None
            if latest is not None and (latest.get("host"), latest.get("pid")) != tuple(instance):
                return
        await self.redis.hdel(self.key, name)

    async def agents(self) -> list[dict]:
        now = time.time()
        out = []
        for raw in (await self.redis.hgetall(self.key)).values():
            agent = orjson.loads(raw)
            if agent.get("status") == "alive" and now - agent["last_heartbeat"] > self.lost_after_s:
                agent["status"] = "lost"
            out.append(agent)
        return sorted(out, key=lambda a: a["name"])

    async def live_capabilities(self) -> set[str]:
        return {c for a in await self.agents() if a["status"] == "alive" for c in a["capabilities"]}

    async def live_agents(self) -> set[str]:
        return {a["name"] for a in await self.agents() if a["status"] == "alive"}
