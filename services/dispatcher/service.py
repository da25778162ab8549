"""Routes ready tasks to agents.

A task naming an agent goes to that agent's queue; otherwise to its capability's queue, where
competing agents take it in priority order. A capability with no live agent gets nothing: its tasks
wait in a hold queue (their `reason` says why) and flow on as soon as an agent for it appears.
"""

from __future__ import annotations

import logging
import time

from switchboard import telemetry
from switchboard.protocol import Envelope, MessageType
from switchboard.registry import RegistryClient
from switchboard.runtime import Service
from switchboard.workflows import WorkflowStore

log = logging.getLogger(__name__)

REFRESH_S = 0.5


class Dispatcher(Service):
    name = "dispatcher"
    default_port = 8102
    uses_store = True
    uses_redis = True

    async def setup(self) -> None:
        self.registry = RegistryClient(self.redis, self.settings)
        self.workflows = WorkflowStore(self.store, self.settings)
        self.held_key = f"{self.settings.namespace}:held-capabilities"
        self.live_capabilities: set[str] = set()
        self.live_agents: set[str] = set()
        self.hold_consumers: dict[str, object] = {}
        self.refreshed_at = 0.0
        await self._refresh()
        await self.consume(self.bus.topology.dispatch, self.route, prefetch=256)
        self.every(REFRESH_S, self._refresh, "registry refresh")

    async def teardown(self) -> None:
        for consumer in self.hold_consumers.values():
            await consumer.stop()
        self.hold_consumers.clear()

    async def route(self, env: Envelope, message=None) -> None:
        if env.type != MessageType.TASK or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task message: type={env.type.value} subject={env.subject!r}")
        topology = self.bus.topology
        agent = env.payload.get("agent")
        capability = env.payload.get("capability") or env.target
        if agent:
            queue, route = topology.agent_queue(agent), "agent"
        elif capability in self.live_capabilities:
            queue, route = topology.capability_queue(capability), "capability"
        else:
            queue, route = topology.hold_queue(capability), "held"
        await self.bus.ensure_work_queue(queue)
        await self.bus.publish(env, queue)
        telemetry.TASKS_DISPATCHED.labels(route).inc()
        if route == "held":
            await self.redis.sadd(self.held_key, capability)
            await self.workflows.note_waiting(env.workflow_id, env.task_id,
                                              f"waiting for a live agent with capability {capability!r}")
        elif route == "agent" and agent not in self.live_agents:
            await self.workflows.note_waiting(env.workflow_id, env.task_id, f"waiting for agent {agent!r}")

    async def _refresh(self) -> None:
        self.live_capabilities = await self.registry.live_capabilities()
        self.live_agents = await self.registry.live_agents()
        held = {c.decode() for c in await self.redis.smembers(self.held_key)}
        # Drain a hold queue while its capability is live; stop when no agent serves it any more.
        for capability in held & self.live_capabilities:
            if capability not in self.hold_consumers:
                queue = self.bus.topology.hold_queue(capability)
                await self.bus.ensure_work_queue(queue)
                self.hold_consumers[capability] = await self.bus.consume(queue, self.route, prefetch=256)
        for capability in set(self.hold_consumers) - self.live_capabilities:
            await self.hold_consumers.pop(capability).stop()
        self.refreshed_at = time.monotonic()

    def is_ready(self) -> bool:
        return super().is_ready() and time.monotonic() - self.refreshed_at < 10 * REFRESH_S + 5
