"""Many agents in one process, cheaply (`AgentHost(agents).run()`, or `switchboard host module:build`).

Run side by side as services of their own, each agent would open a connection, subscribe to the control
fanout and heartbeat on its own timer: hundreds of them swamp one event loop, and heartbeats time out.
Hosted, they share one AMQP connection and its publishing channel, one control subscription that the
host passes to each, and one heartbeat loop that reports them all in one message (`agents.heartbeat`).
Each agent keeps a channel for its tasks and one for its replies, so its prefetch and acks stay its own.
They start a few at a time, and stop together: each drains its own work, then the connection closes.
Sharing a connection, hosted agents share its broker user (the first agent's AMQP URL): an agent with a
broker user of its own (`switchboard agent-credentials`) runs in a process of its own.
"""

from __future__ import annotations

import asyncio
import importlib
import logging

from switchboard import runtime
from switchboard.protocol import Envelope, MessageType
from switchboard.sdk import Agent

log = logging.getLogger(__name__)

START_AT_ONCE = 64  # agents starting at the same time: each declares its queues and opens two channels


class AgentHost(runtime.Service):
    name = "agents"
    default_port = 8110

    def __init__(self, agents: list[Agent]):
        if not agents:
            raise ValueError("an AgentHost needs at least one agent")
        names = [a.name for a in agents]
        if len(set(names)) != len(names):
            raise ValueError("agents in one host need names of their own")
        super().__init__(agents[0].settings)
        self.bus.outbox = self.bus.topology.agent_out  # as its agents publish, so it needs no other right
        self.agents = agents
        self.started: list[Agent] = []
        self.stopped: bool | None = None  # the emergency stop, as the first agent found it when it started

    async def setup(self) -> None:
        for agent in self.agents:
            agent.host = self
            agent.bus.share(self.bus)
        await self.subscribe_control(self._on_control)
        first, rest = self.agents[0], self.agents[1:]
        await first.start()  # asks the coordinators whether an emergency stop is on, for every agent here
        self.started.append(first)
        self.stopped = first._stopped
        for begin in range(0, len(rest), START_AT_ONCE):
            batch = rest[begin:begin + START_AT_ONCE]
            await asyncio.gather(*(agent.start() for agent in batch))
            self.started.extend(batch)
        await self._beat()  # registers them all
        self.every(self.settings.heartbeat_interval_s, self._beat, "heartbeat")
        log.info("hosting %d agents", len(self.started))

    async def _on_control(self, env: Envelope, message) -> None:
        for agent in self.started:
            await agent._on_control(env, message)

    async def _beat(self) -> None:
        for agent in self.started:
            await agent._sync_consuming()  # ends a stand-back whose time is up
        env = Envelope(type=MessageType.EVENT, subject="agents.heartbeat", source=self.name,
                       payload={"agents": [agent.registration() for agent in self.started]})
        await self.bus.publish(env, self.bus.topology.registry)

    async def stop(self) -> None:
        """The heartbeat first (nothing beats for an agent that is stopping), then every agent at once,
        each draining its own work, then the control subscription and the connection."""
        for task in self._background:
            task.cancel()
        started, self.started = self.started, []
        results = await asyncio.gather(*(agent.stop() for agent in started), return_exceptions=True)
        for agent, result in zip(started, results):
            if isinstance(result, Exception):
                log.warning("agent %s did not stop cleanly: %s", agent.name, result)
        await super().stop()

    def is_ready(self) -> bool:
        return super().is_ready() and len(self.started) == len(self.agents)


def load(target: str, settings=None) -> list[Agent]:
    """The agents that `module:callable` builds (called with the settings) or `module:attribute` holds."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"{target!r}: give module:callable, e.g. example_agents:build")
    found = getattr(importlib.import_module(module_name), attribute)
    agents = found(settings) if callable(found) and not isinstance(found, Agent) else found
    agents = [agents] if isinstance(agents, Agent) else list(agents)
    if not agents or not all(isinstance(a, Agent) for a in agents):
        raise ValueError(f"{target!r} gives no list of Agent")
    return agents
