"""Agent discovery: records agents' registrations and heartbeats in Redis, marks silent agents lost,
and forgets them after a longer silence. Agents that stop cleanly deregister. The default limits an
agent declares for its capabilities go to the store (switchboard.limits), where workflows are created."""

from __future__ import annotations

import logging
import time

import redis
from pydantic import ValidationError

from switchboard import limits, stream, telemetry
from switchboard.bus import Transient
from switchboard.protocol import CapabilityLimits, Envelope
from switchboard.registry import RegistryClient
from switchboard.runtime import Service

log = logging.getLogger(__name__)

SWEEP_S = 1.0
FORGET_AFTER_S = 3600.0


class Registry(Service):
    name = "registry"
    default_port = 8103
    uses_redis = True
    uses_store = True

    async def setup(self) -> None:
        self.client = RegistryClient(self.redis, self.settings)
        self.declared: dict[str, dict] = {}  # capability → the default limits last written for it
        # What this replica last told the event stream about each agent: only a change of status is an
        # event (registered, lost, stopped), not every heartbeat. Bounded by the agents the sweep keeps.
        self.told: dict[str, str] = {}
        await self.consume(self.bus.topology.registry, self.handle, prefetch=256)
        self.every(SWEEP_S, self._sweep, "registry sweep")

    async def handle(self, env: Envelope, message) -> None:
        try:
            await self._handle(env)
        except redis.RedisError as exc:  # Redis restarting: the heartbeat is requeued, not dead-lettered
            raise Transient(f"redis: {exc}") from exc

    async def _handle(self, env: Envelope) -> None:
        if env.subject == "agent.heartbeat":
            await self._heartbeats([env.payload], env.timestamp)
        elif env.subject == "agents.heartbeat":  # every agent of an AgentHost (switchboard.hosting)
            agents = env.payload.get("agents")
            if not isinstance(agents, list):
                raise ValueError("agents.heartbeat needs a list of agents")
            await self._heartbeats(agents, env.timestamp)
        elif env.subject == "agent.stopped":
            await self.client.remove(env.payload["name"], instance=(env.payload.get("host"), env.payload.get("pid")))
            await self._tell(env.payload, "stopped")
        else:
            raise ValueError(f"registry does not handle subject {env.subject!r}")

    async def _heartbeats(self, payloads: list, sent_at: float) -> None:
        infos = []
        for payload in payloads:
            if not isinstance(payload, dict) or not isinstance(payload.get("name"), str) \
                    or not isinstance(payload.get("capabilities"), list):
                raise ValueError("heartbeat needs a name and a list of capabilities")
            # A heartbeat delayed in the queue must not revive an agent: judge by when it was sent.
            infos.append({k: payload[k] for k in ("name", "capabilities")}
                         | {k: payload.get(k) for k in ("concurrency", "in_flight", "host", "pid")}
                         | {"status": "alive", "last_heartbeat": min(sent_at, time.time())})
        await self.client.upsert_many(infos)
        for info, payload in zip(infos, payloads):
            await self._tell(info, "registered")
            if payload.get("limits"):
                await self._declare(info["name"], info["capabilities"], payload["limits"])

    async def _declare(self, agent: str, capabilities: list, declared: object) -> None:
        """Stores the default limits an agent declares for capabilities it serves, when they change."""
        try:
            checked = {capability: CapabilityLimits.model_validate(value).stored()
                       for capability, value in dict(declared).items() if capability in capabilities}
        except (ValidationError, TypeError, ValueError) as exc:
            log.warning("agent %s declares limits that are not valid, ignored: %s", agent, exc)
            return
        changed = {c: v for c, v in checked.items() if v and self.declared.get(c) != v}
        if changed:
            ns = self.settings.namespace

            def txn(tr) -> None:
                for capability, value in changed.items():
                    limits.set_defaults(tr, ns, capability, "agent", value)

            await self.store.transact(txn)
            self.declared.update(changed)

    async def _sweep(self) -> None:
        now = time.time()
        counts = {"alive": 0, "lost": 0}
        for agent in await self.client.agents():
            silent = now - agent["last_heartbeat"]
            if silent > FORGET_AFTER_S:
                await self.client.remove(agent["name"])
                self.told.pop(agent["name"], None)
                continue
            if agent["status"] == "lost":
                await self._tell(agent, "lost")
                if not agent.get("lost_at"):
                    log.warning("agent %s lost: no heartbeat for %.1fs", agent["name"], silent)
                    await self.client.upsert(agent | {"lost_at": now})
            counts[agent["status"]] = counts.get(agent["status"], 0) + 1
        telemetry.emit("agents.counted", counts=counts)

    async def _tell(self, agent: dict, change: str) -> None:
        name = agent.get("name")
        if not isinstance(name, str) or self.told.get(name) == change:
            return
        self.told[name] = change
        await stream.publish(self.bus, [stream.agent_change(agent, change)])
