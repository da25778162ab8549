"""Every exchange and queue, named and declared in one place, so their arguments always agree.

Flow:  api ──workflow.submitted──▶ coordinator ──ready task──▶ dispatch ──▶ dispatcher
       api ──ready task (its workflow has no dependencies)──▶ dispatch
       dispatcher ──▶ cap.<capability> | agent.<name> | hold.<capability> (no live agent yet; dead-lettered
                      after unroutable_after_s) | paused.<capability> (paused, or its breaker is open)
       aggregator ──retry──▶ delay.<ms> ──(TTL expires)──▶ dispatch
       agent ──status/result/error──▶ results ──▶ aggregator ─tasks.succeeded─▶ coordinator
       agent ──register/heartbeat──▶ registry;  anything unprocessable ──▶ dlx ──▶ dlq ──▶ dlq-replayer
       agents publish only through agent-out (direct), bound to results, registry and coordinator: RabbitMQ
                  checks write permission on the exchange, so an agent's broker user may write there and
                  nowhere else (see switchboard.credentials)
       api ──replay requests──▶ replay ──▶ dlq-replayer (rate-limited)
       control (fanout): pause, resume, stop-all, cancel ──▶ every dispatcher and agent
       dispatcher ──a task with limits──▶ limited.<gate id> ──(admitted: switchboard.limits)──▶ cap.<capability>
       aggregator ──limits.released (slots freed)──▶ limits ──▶ a dispatcher, which admits who waits
       agent ──event.publish──▶ results ──▶ aggregator (logs a task's) ──▶ topics (topic exchange)
                  ──▶ sub.<agent name> (one queue per agent name, bound to its patterns: its replicas share it)
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass

import aio_pika
from aio_pika.abc import AbstractChannel

from switchboard.protocol import MAX_PRIORITY

SUBSCRIPTION_BACKLOG = 1_000_000


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
    def replay(self) -> str:
        return f"{self.namespace}.replay"

    @property
    def dlx(self) -> str:
        return f"{self.namespace}.dlx"

    @property
    def control(self) -> str:
        return f"{self.namespace}.control"

    @property
    def events(self) -> str:
        return f"{self.namespace}.events"

    @property
    def topics(self) -> str:
        return f"{self.namespace}.topics"

    @property
    def limits(self) -> str:
        return f"{self.namespace}.limits"

    @property
    def agent_out(self) -> str:
        return f"{self.namespace}.agent-out"

    @property
    def agent_out_targets(self) -> tuple[str, ...]:
        """The queues agent-out routes to (by their names as routing keys): all an agent may publish to."""
        return self.results, self.registry, self.coordinator

    def private_queue(self, kind: str, owner: str) -> str:
        """A process's own exclusive queue, `<ns>.<kind>.<owner>.<12 hex>` (kind reply or control): the
        owner's name in it lets an agent's broker user be allowed its own private queues and no others'."""
        return f"{self.private_prefix(kind, owner)}{uuid.uuid4().hex[:12]}"

    def private_prefix(self, kind: str, owner: str) -> str:
        """What every private queue of this kind and owner starts with (switchboard.credentials)."""
        return f"{self.namespace}.{kind}.{owner}."

    def capability_queue(self, capability: str) -> str:
        return f"{self.namespace}.cap.{capability}"

    def agent_queue(self, agent: str) -> str:
        return f"{self.namespace}.agent.{agent}"

    def subscription_queue(self, agent: str) -> str:
        return f"{self.namespace}.sub.{agent}"

    def hold_queue(self, capability: str) -> str:
        return f"{self.namespace}.hold.{capability}"

    def paused_queue(self, capability: str) -> str:
        return f"{self.namespace}.paused.{capability}"

    def limited_queue(self, gate_id: str) -> str:
        return f"{self.namespace}.limited.{gate_id}"

    def delay_queue(self, target: str, delay_ms: int) -> str:
        return f"{target}.delay.{delay_ms}"

    def kind(self, name: str) -> str:
        """What a queue or exchange is for, without the ids in its name: dispatch, cap, agent, hold, paused,
        results, delay, control, reply, dlq, coordinator, registry, replay, events, topics, sub, limited
        or limits (the metrics' label)."""
        return _kind(self.namespace, name)

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
        await channel.declare_exchange(self.topics, aio_pika.ExchangeType.TOPIC, durable=True)
        agent_out = await channel.declare_exchange(self.agent_out, aio_pika.ExchangeType.DIRECT, durable=True)
        for name, priority in (
            (self.dispatch, True),
            (self.coordinator, False),
            (self.results, False),
            (self.registry, False),
            (self.replay, False),
            (self.limits, False),
        ):
            queue = await channel.declare_queue(name, durable=True, arguments=self._arguments(priority=priority))
            if name in self.agent_out_targets:
                await queue.bind(agent_out, routing_key=name)

    async def check(self, channel: AbstractChannel) -> None:
        """What an agent whose broker user may not declare needs, checked passively (which needs no
        permission): a missing one raises ChannelNotFoundEntity. The platform, or `switchboard
        agent-credentials create`, declares them."""
        for exchange in (self.control, self.agent_out, self.topics):
            await channel.declare_exchange(exchange, passive=True)
        for name in self.agent_out_targets:
            await channel.declare_queue(name, passive=True)

    async def declare_work_queue(self, channel: AbstractChannel, name: str, *, ttl_s: float | None = None) -> None:
        """A capability, agent, hold, paused or limited queue: durable, so queued tasks outlive every process.
        A hold queue has a TTL: what no agent took by then is dead-lettered, reason "expired"."""
        arguments = self._arguments(priority=True)
        if ttl_s is not None:
            arguments["x-message-ttl"] = int(ttl_s * 1000)
        await channel.declare_queue(name, durable=True, arguments=arguments)

    async def declare_subscription(self, channel: AbstractChannel, agent: str, patterns: list[str], *,
                                   passive: bool = False) -> str:
        """The queue of an agent name's event subscriptions, bound to each pattern. Its replicas consume
        it as competing consumers, so each event reaches one replica of each subscribed agent name. It
        holds at most SUBSCRIPTION_BACKLOG events: past that, the broker dead-letters the newest, which
        the DLQ keeps for replay, rather than grow without bound while the agent is away. Passive: an
        agent with a broker user of its own, which may bind the queue but not declare it."""
        name = self.subscription_queue(agent)
        if passive:
            queue = await channel.declare_queue(name, passive=True)
        else:
            queue = await channel.declare_queue(name, durable=True, arguments={
                "x-dead-letter-exchange": self.dlx, "x-max-length": SUBSCRIPTION_BACKLOG,
                "x-overflow": "reject-publish-dlx"})
        for pattern in patterns:
            await queue.bind(self.topics, routing_key=pattern)
        return name

    async def declare_delay_queue(self, channel: AbstractChannel, target: str, delay_ms: int) -> str:
        """A queue nobody consumes: messages wait out their TTL, then dead-letter into `target`. It
        deletes itself a minute after its last use, so a spread of delays leaves nothing behind; every
        publish declares it again, which also restarts that minute."""
        name = self.delay_queue(target, delay_ms)
        await channel.declare_queue(name, durable=True, arguments={
            "x-message-ttl": delay_ms, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": target,
            "x-expires": delay_ms + 60_000, "x-max-priority": MAX_PRIORITY})
        return name


_KINDS = {"dispatch": "dispatch", "cap": "cap", "agent": "agent", "hold": "hold", "paused": "paused",
          "results": "results", "coordinator": "coordinator", "registry": "registry", "replay": "replay",
          "dlq": "dlq", "dlx": "dlq", "control": "control", "events": "events", "reply": "reply",
          "topics": "topics", "sub": "sub", "limited": "limited", "limits": "limits"}


@functools.lru_cache(maxsize=4096)  # bounded: reply queues' names are new with every agent process
def _kind(namespace: str, name: str) -> str:
    head, _, rest = name.removeprefix(f"{namespace}.").partition(".")
    if not name.startswith(f"{namespace}."):
        # A private queue bound to the control fanout: named by the broker (amq.gen-…) or aio-pika (amq_…).
        return "control" if name.startswith(("amq.", "amq_")) else "other"
    if head == "dispatch" and rest:
        return "delay"  # <ns>.dispatch.delay.<ms>
    return _KINDS.get(head, "other")
