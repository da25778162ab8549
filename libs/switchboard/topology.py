"""Every exchange and queue, named and declared in one place, so their arguments always agree.

Flow:  api ──workflow.submitted──▶ coordinator ──ready task──▶ dispatch ──▶ dispatcher
       dispatcher ──▶ cap.<capability> | agent.<name> | hold.<capability> (no live agent yet)
       agent ──status/result/error──▶ results ──▶ aggregator ──task.succeeded──▶ coordinator
       agent ──register/heartbeat──▶ registry;  anything unprocessable ──▶ dlx ──▶ dlq ──▶ dlq-replayer
       control (fanout): pause, resume, stop-all, cancel ──▶ every dispatcher and agent
"""

from __future__ import annotations

from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange

from switchboard.protocol import MAX_PRIORITY


@dataclass(frozen=True)
class Topology:
    namespace: str

    @property
    def dispatch(self) -> str:
        return f"{self.namespace}.dispatch"

    @property
    def coordinator(self) -> str:
        return f"{self.namespace}.coordinator"

    @property
    def results(self) -> str:
        return f"{self.namespace}.results"

    @property
    def registry(self) -> str:
        return f"{self.namespace}.registry"

    @property
    def dlq(self) -> str:
        return f"{self.namespace}.dlq"

    @property
    def dlx(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def control(self) -> str:
        return f"{self.namespace}.control"

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    def capability_queue(self, capability: str) -> str:
        return f"{self.namespace}.cap.{capability}"

    def agent_queue(self, agent: str) -> str:
        return f"{self.namespace}.agent.{agent}"

    def hold_queue(self, capability: str) -> str:
        return f"{self.namespace}.hold.{capability}"

    def _arguments(self, *, priority: bool) -> dict:
        arguments: dict = {"x-dead-letter-exchange": self.dlx}
        if priority:
            arguments["x-max-priority"] = MAX_PRIORITY
        return arguments

    async def declare(self, channel: AbstractChannel) -> None:
        """The exchanges and the services' own queues. Idempotent; every process calls it at start."""
        dlx = await channel.declare_exchange(self.dlx, aio_pika.ExchangeType.FANOUT, durable=True)
        dlq = await channel.declare_queue(self.dlq, durable=True)
        await dlq.bind(dlx)
        await channel.declare_exchange(self.control, aio_pika.ExchangeType.FANOUT, durable=True)
        await channel.declare_exchange(self.events, aio_pika.ExchangeType.TOPIC, durable=True)
        for name, priority in (
            (self.dispatch, True),
            (self.coordinator, False),
            (self.results, False),
            (self.registry, False),
        ):
            await channel.declare_queue(name, durable=True, arguments=self._arguments(priority=priority))

    async def declare_work_queue(self, channel: AbstractChannel, name: str) -> None:
        """A capability, agent or hold queue: durable, so queued tasks outlive every process."""
        await channel.declare_queue(name, durable=True, arguments=self._arguments(priority=True))

    async def control_exchange(self, channel: AbstractChannel) -> AbstractExchange:
        return await channel.get_exchange(self.control, ensure=False)
