"""Routes ready tasks to agents.

A task naming an agent goes to that agent's queue; otherwise to its capability's queue, where competing
agents take it in priority order. A task that cannot go yet waits in a queue of its own, with its
`reason` recorded:
  hold.<capability>    no live agent serves the capability (dead-lettered after unroutable_after_s)
  paused.<capability>  the capability is paused, or its circuit breaker is open (waits indefinitely)
Such queues drain back through routing as soon as the reason is gone. Stop-all and a global pause stop
consuming the dispatch queue itself: work stays there, in order, until resumed.
"""

from __future__ import annotations

import asyncio
import logging
import time

import redis

from switchboard import telemetry
from switchboard.breakers import Breakers, allows
from switchboard.bus import Consumer
from switchboard.control import Controls, dispatch_blocked
from switchboard.protocol import Envelope, MessageType
from switchboard.registry import RegistryClient
from switchboard.runtime import Service
from switchboard.state import pack, prefix_range, unpack
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
        self.controls = Controls(self.store, self.settings.namespace)
        self.breakers = Breakers(redis.Redis.from_url(self.settings.redis_url), self.settings)
        self.control = await self.controls.get()
        self.live_capabilities: set[str] = set()
        self.live_agents: set[str] = set()
        self.breaker_states: dict[str, dict] = {}
        self.parked: set[str] = set()  # capabilities whose hold or paused queue may hold tasks
        self.drainers: dict[str, Consumer] = {}
        self.dispatch_consumer = await self.consume(self.bus.topology.dispatch, self.route, prefetch=256,
                                                    paused=True)
        self.refreshed_at = 0.0
        await self._refresh()
        await self.subscribe_control(self._on_control)
        self.every(REFRESH_S, self._refresh, "routing refresh")

    async def teardown(self) -> None:
        for consumer in self.drainers.values():
            await consumer.stop()
        self.drainers.clear()

    def _blocked(self, capability: str) -> str | None:
        reason = dispatch_blocked(self.control, capability)
        if reason is None and not allows(self.breaker_states.get(f"cap:{capability}")):
            reason = f"circuit breaker open for capability {capability!r}"
        return reason

    async def route(self, env: Envelope, message=None) -> None:
        if env.type != MessageType.TASK or not env.workflow_id or not env.task_id:
            raise ValueError(f"not a task message: type={env.type.value} subject={env.subject!r}")
        topology = self.bus.topology
        agent = env.payload.get("agent")
        capability = env.payload.get("capability") or env.target
        reason = self._blocked(capability)
        if reason:
            queue, route = topology.paused_queue(capability), "paused"
        elif agent:
            queue, route = topology.agent_queue(agent), "agent"
            reason = None if agent in self.live_agents else f"waiting for agent {agent!r}"
        elif capability in self.live_capabilities:
            queue, route = topology.capability_queue(capability), "capability"
        else:
            queue, route = topology.hold_queue(capability), "held"
            reason = f"waiting for a live agent with capability {capability!r}"
        if route in ("paused", "held"):
            await self._park(capability)
        await self.bus.ensure_work_queue(queue)
        await self.bus.publish(env, queue)
        telemetry.TASKS_DISPATCHED.labels(route).inc()
        if reason:
            await self.workflows.note_waiting(env.workflow_id, env.task_id, reason)

    async def _park(self, capability: str) -> None:
        if capability not in self.parked:
            key = pack(self.settings.namespace, "parked", capability)
            await self.store.transact(lambda tr: tr.set(key, b""))
            self.parked.add(capability)

    async def _on_control(self, env: Envelope, message) -> None:
        if env.subject == "control.state":
            self.control = env.payload
            await self._apply()

    async def _refresh(self) -> None:
        self.live_capabilities = await self.registry.live_capabilities()
        self.live_agents = await self.registry.live_agents()
        ns = self.settings.namespace
        rows = await self.store.read(lambda tr: tr.get_range(*prefix_range(ns, "parked")))
        self.parked |= {unpack(k)[-1] for k, _ in rows}
        self.control = await self.controls.get()  # a control broadcast missed while disconnected
        names = [f"cap:{c}" for c in self.live_capabilities | self.parked] + [f"agent:{a}" for a in self.live_agents]
        self.breaker_states = await asyncio.to_thread(self.breakers.snapshot, names)
        await self._apply()
        self.refreshed_at = time.monotonic()

    async def _apply(self) -> None:
        """Consume what may flow now, stop consuming what may not."""
        if self.control["stopped"] or self.control["paused"]:
            await self.dispatch_consumer.pause()
        else:
            await self.dispatch_consumer.resume()
        topology = self.bus.topology
        wanted = set()
        for capability in self.parked:
            if not self._blocked(capability):
                wanted.add(topology.paused_queue(capability))
                if capability in self.live_capabilities:
                    wanted.add(topology.hold_queue(capability))
        for queue in set(self.drainers) - wanted:
            await self.drainers.pop(queue).stop()
        for queue in wanted - set(self.drainers):
            await self.bus.ensure_work_queue(queue)
            self.drainers[queue] = await self.bus.consume(queue, self.route, prefetch=64)

    def is_ready(self) -> bool:
        return super().is_ready() and time.monotonic() - self.refreshed_at < 10 * REFRESH_S + 5
