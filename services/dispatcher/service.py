"""Routes ready tasks to agents.

A task naming an agent goes to that agent's queue; otherwise to its capability's queue, where competing
agents take it in priority order. A task that cannot go yet waits in a queue of its own, with its
`reason` recorded:
  hold.<capability>    no live agent serves the capability (dead-lettered after unroutable_after_s)
  paused.<capability>  the capability is paused, or its circuit breaker is open (waits indefinitely)
Such queues drain back through routing as soon as the reason is gone. Stop-all and a global pause stop
consuming the dispatch queue itself: work stays there, in order, until resumed. A task with rate or
concurrency limits first waits for its admission (see admission.py), then is routed the same way.
"""

from __future__ import annotations

import logging
import time

from switchboard.bus import Consumer
from switchboard.protocol import Envelope, MessageType
from switchboard.routing import REFRESH_S, Routes
from switchboard.runtime import Service
from switchboard.state import pack, prefix_range, unpack
from switchboard.workflows import WorkflowStore

from .admission import Admission

log = logging.getLogger(__name__)


class Dispatcher(Service):
    name = "dispatcher"
    default_port = 8102
    uses_store = True
    uses_redis = True

    async def setup(self) -> None:
        self.workflows = WorkflowStore(self.store, self.settings)
        self.routes = Routes(self.store, self.redis, self.settings)
        self.parked: set[str] = set()  # capabilities whose hold or paused queue may hold tasks
        self.drainers: dict[str, Consumer] = {}
        self.admission = Admission(self)
        await self.admission.start()
        self.dispatch_consumer = await self.consume(self.bus.topology.dispatch, self.route, prefetch=256,
                                                    paused=True)
        self.refreshed_at = 0.0
        await self._refresh()
        await self.subscribe_control(self._on_control)
        self.every(REFRESH_S, self._refresh, "routing refresh")

    async def teardown(self) -> None:
        await self.admission.stop()
        for consumer in self.drainers.values():
            await consumer.stop()
        self.drainers.clear()

    async def route(self, env: Envelope, message=None) -> None:
        _check_task(env)
        gate = env.payload.get("limits")
        if gate:
            await self.admission.park(env, gate)
        else:
            await self.send_on(env)

    async def reroute(self, env: Envelope, message=None) -> None:
        """Routes a task back from a hold or paused queue. Only send_on puts tasks there, so one with
        limits was admitted already: a second admission would wait, behind the gate's next task, for
        the very slot this one holds."""
        _check_task(env)
        await self.send_on(env)

    async def send_on(self, env: Envelope) -> None:
        """Routes a task that may go (it has no limits, or was admitted)."""
        topology = self.bus.topology
        agent = env.payload.get("agent")
        capability = env.payload.get("capability") or env.target
        reason = self.routes.blocked(capability)
        if reason:
            queue, route = topology.paused_queue(capability), "paused"
        elif agent:
            queue, route = topology.agent_queue(agent), "agent"
            reason = None if agent in self.routes.live_agents else f"waiting for agent {agent!r}"
        elif capability in self.routes.live_capabilities:
            queue, route = topology.capability_queue(capability), "capability"
        else:
            queue, route = topology.hold_queue(capability), "held"
            reason = f"waiting for a live agent with capability {capability!r}"
        if route in ("paused", "held"):
            await self._park(capability)
        await self.bus.ensure_work_queue(queue)
        await self.bus.publish(env, queue)
        if reason:
            await self.workflows.note_waiting(env.workflow_id, env.task_id, reason)

    async def _park(self, capability: str) -> None:
        if capability not in self.parked:
            key = pack(self.settings.namespace, "parked", capability)
            await self.store.transact(lambda tr: tr.set(key, b""))
            self.parked.add(capability)

    async def _on_control(self, env: Envelope, message) -> None:
        if env.subject == "control.state":
            self.routes.on_control(env.payload)
            await self._apply()

    async def _refresh(self) -> None:
        ns = self.settings.namespace
        rows = await self.store.read(lambda tr: tr.get_range(*prefix_range(ns, "parked")))
        self.parked |= {unpack(k)[-1] for k, _ in rows}
        await self.routes.refresh(self.parked)
        await self.admission.refresh()
        await self._apply()
        self.refreshed_at = time.monotonic()

    async def _apply(self) -> None:
        """Consume what may flow now, stop consuming what may not."""
        if self.routes.control["stopped"] or self.routes.control["paused"]:
            await self.dispatch_consumer.pause()
        else:
            await self.dispatch_consumer.resume()
        topology = self.bus.topology
        wanted = set()
        for capability in self.parked:
            if not self.routes.blocked(capability):
                wanted.add(topology.paused_queue(capability))
                if capability in self.routes.live_capabilities:
                    wanted.add(topology.hold_queue(capability))
        for queue in set(self.drainers) - wanted:
            await self.drainers.pop(queue).stop()
        for queue in wanted - set(self.drainers):
            await self.bus.ensure_work_queue(queue)
            self.drainers[queue] = await self.bus.consume(queue, self.reroute, prefetch=64)

    def is_ready(self) -> bool:
        return super().is_ready() and time.monotonic() - self.refreshed_at < 10 * REFRESH_S + 5


def _check_task(env: Envelope) -> None:
    if env.type != MessageType.TASK or not env.workflow_id or not env.task_id:
        raise ValueError(f"not a task message: type={env.type.value} subject={env.subject!r}")
