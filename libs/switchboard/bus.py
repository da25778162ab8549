"""RabbitMQ for every service and agent: one robust connection, confirmed publishes, managed consumers.

A consumer's handler gets a decoded Envelope. The bus acks after the handler returns, requeues on a
Transient error (after a short pause, so an outage does not become a hot loop), and dead-letters, with
the reason, anything that does not parse or that the handler rejects: a bad message is never retried
forever.

Every message carries the AMQP user_id of the bus's broker user: RabbitMQ refuses a message whose
user_id is not the user of the connection that publishes it, so a receiver can trust it (the aggregator
takes outcomes of an attempt only from the user that claimed it). An agent with broker credentials of
its own (switchboard.credentials) may not declare the platform's exchanges and queues nor publish to
the dead-letter exchange: its bus finds out at connect (`restricted`), checks the topology passively,
and dead-letters by rejecting, so the broker itself moves the message to the dead-letter exchange.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq
import aiormq.abc
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from switchboard import telemetry, wire
from switchboard.wire import BATCH_HEADER, Acks, Coalescer, settle
from switchboard.telemetry import Consumed, Published
from switchboard.protocol import Envelope
from switchboard.settings import Settings, amqp_username
from switchboard.state.base import StoreUnavailable
from switchboard.topology import Topology

log = logging.getLogger(__name__)

Handler = Callable[[Envelope, AbstractIncomingMessage], Awaitable[None]]
REASON_HEADER = "x-switchboard-reason"
QUEUE_HEADER = "x-switchboard-queue"
_TRANSIENT_PAUSE_S = 0.5
_PUBLISH_WINDOW = 256


class Transient(Exception):
    """Processing failed for a reason that will pass (a dependency is down): requeue the message."""


# What passes by itself: our own Transient, a busy store, and a broker connection or channel that is
# down or not yet restored after a reconnect (aiormq raises ChannelInvalidStateError, a RuntimeError).
TRANSIENT = (Transient, StoreUnavailable, aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError,
             aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


# RabbitMQ closes a channel whose delivery stays unacked past its consumer timeout (30 min by default).
# Consumers that hold a message as long as its work takes (an agent's tasks; a task waiting for its
# admission) ask to be exempt: RabbitMQ >= 3.12 honours this per consumer, older brokers need
# consumer_timeout raised in rabbitmq.conf. The coordinator's watchdog decides when a task is overdue.
LONG_HELD = {"x-consumer-timeout": 8 * 24 * 3600 * 1000}


class Consumer:
    """Consumes one or more queues on one channel with manual acks."""

    def __init__(self, bus: Bus, channel: AbstractChannel, queues: list[AbstractQueue], handler: Handler,
                 raw: bool = False, arguments: dict | None = None):
        self._bus, self._channel, self._queues, self._handler = bus, channel, queues, handler
        self._raw = raw
        self._arguments = arguments
        self._tags: list[tuple[AbstractQueue, str]] = []
        self._active = False  # consuming (started and not paused), so a queue added is consumed at once
        self._in_flight: set[asyncio.Task] = set()
        self._acks: Acks | None = None  # of the channel's latest deliveries

    async def start(self) -> None:
        self._active = True
        for queue in self._queues:
            await self._start(queue)

    async def _start(self, queue: AbstractQueue) -> None:
        tag = await queue.consume(functools.partial(self._deliver, queue.name), arguments=self._arguments)
        self._tags.append((queue, tag))

    async def add(self, name: str) -> None:
        """Consumes one more (existing) queue on this channel, with the same prefetch."""
        queue = await self._channel.declare_queue(name, passive=True)
        self._queues.append(queue)
        if self._active:
            await self._start(queue)

    @property
    def consuming(self) -> bool:
        return bool(self._tags)

    async def pause(self) -> None:
        """Take no more messages; in-flight ones go on and are acked on this channel as usual."""
        tags, self._tags = self._tags, []
        self._active = False
        if not self._channel.is_closed:
            for queue, tag in tags:
                try:
                    await queue.cancel(tag)
                except aio_pika.exceptions.AMQPError:
                    pass

    async def resume(self) -> None:
        if not self._active:
            await self.start()

    async def _deliver(self, queue: str, message: AbstractIncomingMessage) -> None:
        channel = message.channel
        acks = wire.channel_acks.get(channel)
        if acks is None:
            acks = wire.channel_acks[channel] = self._acks = Acks(channel)
        acks.note(message)  # before any await: in the order the channel got them
        task = asyncio.current_task()
        self._in_flight.add(task)
        try:
            await self._process(queue, message)
        finally:
            self._in_flight.discard(task)

    async def _process(self, queue: str, message: AbstractIncomingMessage) -> None:
        kind = self._bus.topology.kind(queue)
        if self._raw:
            outcome = await self._process_raw(queue, kind, message)
        else:
            outcome = await self._process_envelope(queue, kind, message)
        telemetry.emit("message.consumed", kind=kind, outcome=outcome)

    async def _process_envelope(self, queue: str, kind: str, message: AbstractIncomingMessage) -> str:
        """Handles one message, or each message of a batch (Coalescer), and settles it; returns how: ok,
        requeued or dead_lettered. A bad message of a batch is dead-lettered alone. One that cannot go
        on yet (Transient) has the whole batch requeued, and the handler sees the others again: the bad
        ones are dead-lettered only on the pass that settles the batch, so once."""
        headers = message.headers or {}
        if headers.get(BATCH_HEADER):
            try:
                items = wire.batch_items(message.body)
            except ValueError as exc:
                await self._bus.dead_letter(message, f"unparseable batch: {_first_line(exc)}", queue)
                await settle(message)
                return "dead_lettered"
        else:
            items = [(headers, message.body)]
        if len(items) == 1:  # no task of its own, as gather would make
            try:
                outcomes = [await self._handle(queue, kind, message, *items[0])]
            except TRANSIENT as exc:
                outcomes = [exc]
        else:
            outcomes = await asyncio.gather(*(self._handle(queue, kind, message, item_headers, body)
                                              for item_headers, body in items), return_exceptions=True)
            for outcome in outcomes:
                if isinstance(outcome, BaseException) and not isinstance(outcome, TRANSIENT):
                    raise outcome
        transient = next((o for o in outcomes if isinstance(o, BaseException)), None)
        if transient is not None:
            return await self._requeue(queue, message, transient)
        try:
            for (item_headers, body), reason in zip(items, outcomes):
                if reason is not None:
                    await self._bus.dead_letter(message, reason, queue, item_headers, body)
        except TRANSIENT as down:  # cannot dead-letter now: try the whole message again later
            return await self._requeue(queue, message, down)
        await settle(message)
        return "dead_lettered" if any(outcomes) else "ok"

    async def _handle(self, queue: str, kind: str, message: AbstractIncomingMessage, headers: dict,
                      body: bytes | dict) -> str | None:
        """Runs the handler on one envelope (a message's body, or an item of a batch). Returns None, or
        why it is to be dead-lettered; raises what is transient."""
        try:
            envelope = Envelope.decode(body) if isinstance(body, bytes) else Envelope.model_validate(body)
        except ValueError as exc:
            return f"unparseable message: {_first_line(exc)}"
        envelope.traceparent = traceparent_of(headers)
        try:
            await telemetry.consuming(Consumed(queue, kind, headers, envelope, envelope.traceparent),
                                      functools.partial(self._handler, envelope, message))
        except TRANSIENT:
            raise
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("dead-lettering message from %s", queue)
            return f"{type(exc).__name__}: {_first_line(exc)}"
        return None

    async def _requeue(self, queue: str, message: AbstractIncomingMessage, exc: BaseException) -> str:
        log.warning("requeueing message from %s: %s", queue, exc)
        await asyncio.sleep(_TRANSIENT_PAUSE_S)
        try:
            await settle(message, requeue=True)
        except TRANSIENT:
            pass  # the channel is gone, and with it the delivery: the broker requeues it by itself
        return "requeued"

    async def _process_raw(self, queue: str, kind: str, message: AbstractIncomingMessage) -> str:
        # Dead letters themselves: nowhere further to dead-letter them, so a failure is logged and dropped.
        try:
            headers = message.headers or {}
            await telemetry.consuming(Consumed(queue, kind, headers, None, traceparent_of(headers)),
                                      functools.partial(self._handler, message))
        except TRANSIENT as exc:
            return await self._requeue(queue, message, exc)
        except Exception:
            log.exception("dropping message from %s that cannot be processed", queue)
            await settle(message, drop=True)
            return "dropped"
        await settle(message)
        return "ok"

    async def stop(self, drain_timeout_s: float = 30.0) -> None:
        """Stop taking messages and let in-flight handlers finish; past the deadline they are cancelled
        and their messages, never acked, are requeued by the broker when the channel closes."""
        await self.pause()
        if self._in_flight:
            _, late = await asyncio.wait(set(self._in_flight), timeout=drain_timeout_s)
            for task in late:
                task.cancel()
            if late:  # bounded too: a handler that swallows its cancellation must not hold up the stop
                _, stuck = await asyncio.wait(late, timeout=drain_timeout_s)
                if stuck:
                    log.warning("%d handlers did not stop when cancelled; closing their channel", len(stuck))
        if self._acks is not None:
            await self._acks.flush()
        if not self._channel.is_closed:
            await self._channel.close()


class Bus:
    def __init__(self, settings: Settings, source: str):
        self.settings = settings
        self.source = source
        self.topology = Topology(settings.namespace)
        self.connection: aio_pika.abc.AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._probe: AbstractChannel | None = None
        self._declared: set[str] = set()
        self._exchanges: dict[str, aio_pika.abc.AbstractExchange] = {}
        # Every message's user_id; none when the URL names no user (EXTERNAL auth: the name is not known here).
        self.user = amqp_username(settings.amqp_url)
        # The exchange that publishes to a queue go through instead of the default one (agents: agent-out).
        self.outbox = ""
        self.restricted = False  # this broker user may not declare the topology (an agent's own user)
        self._shared = False  # the connection is another Bus's (share): that one connects and closes it
        self._coalescers: dict[tuple[str, str], Coalescer] = {}

    def share(self, owner: Bus) -> None:
        """Uses `owner`'s connection and publishing channel, once it connected: many agents in one
        process (switchboard.hosting) cost one connection. Consumers still get channels of their own."""
        self.connection, self._channel = owner.connection, owner._channel
        self.restricted, self._shared = owner.restricted, True

    async def connect(self, *, timeout_s: float = 30.0) -> None:
        if self._shared:
            return
        wire.install()
        self.connection = await asyncio.wait_for(
            aio_pika.connect_robust(
                self.settings.amqp_url, client_properties={"connection_name": self.source}
            ),
            timeout_s,
        )
        self.connection.reconnect_callbacks.add(_count_reconnect)
        self._channel = await self.connection.channel(publisher_confirms=True)
        self.restricted = not await self._may_declare()  # which, if it may, has declared the topology
        if self.restricted:
            await self.topology.check(self._channel)

    async def _may_declare(self) -> bool:
        """Tries the declarations on a channel of their own, which a refusal closes: a plain channel, as
        a robust one would reopen itself."""
        probe = aio_pika.Channel(self.connection)
        await probe
        try:
            await self.topology.declare(probe)
        except aiormq.exceptions.ChannelAccessRefused:
            return False
        finally:
            if not probe.is_closed:
                await probe.close()
        return True

    async def close(self) -> None:
        if self.connection is not None and not self._shared:
            await self.connection.close()
        self.connection = None

    @property
    def is_connected(self) -> bool:
        return self.connection is not None and not self.connection.is_closed

    async def queue_depth(self, name: str) -> int:
        """The messages ready in a queue (0 if there is no such queue), read on a plain channel of its
        own: the broker closes the channel of a passive declaration that finds nothing."""
        if self._probe is None or self._probe.is_closed:
            self._probe = aio_pika.Channel(self.connection)
            await self._probe
        try:
            queue = await self._probe.declare_queue(name, passive=True)
        except aio_pika.exceptions.ChannelNotFoundEntity:
            self._probe = None
            return 0
        return queue.declaration_result.message_count or 0

    async def ensure_work_queue(self, name: str) -> None:
        if name in self._declared:
            return
        if self.restricted:
            # Declared by the platform (or agent-credentials create); a missing one fails here, clearly.
            await self._channel.declare_queue(name, passive=True)
        else:
            hold = name.startswith(self.topology.hold_queue(""))
            await self.topology.declare_work_queue(
                self._channel, name, ttl_s=self.settings.unroutable_after_s if hold else None)
        self._declared.add(name)

    async def _exchange(self, name: str) -> aio_pika.abc.AbstractExchange:
        if not name:
            return self._channel.default_exchange
        if name not in self._exchanges:
            self._exchanges[name] = await self._channel.get_exchange(name, ensure=False)
        return self._exchanges[name]

    async def publish(
        self, envelope: Envelope, routing_key: str, *, exchange: str = "", headers: dict | None = None,
        coalesce: bool = False,
    ) -> bool:
        """Returns once the broker has confirmed the message: after that it survives a broker restart.
        False if no queue took it (the broker returned it): a reply to a process that is gone. With
        `coalesce`, the message may go in one with others for the same queue (Coalescer): for many
        small messages to a consumer that takes batches (an agent's outcomes, to the aggregator)."""
        return await self._send(envelope.encode(), routing_key, exchange, headers or {}, envelope, {
            "content_type": "application/json", "priority": envelope.priority.amqp,
            "message_id": envelope.message_id, "type": envelope.type.value,
            "correlation_id": envelope.correlation_id, "reply_to": envelope.reply_to}, coalesce)

    async def _send(self, body: bytes, routing_key: str, exchange: str, headers: dict, envelope: Envelope | None,
                    properties: dict, coalesce: bool = False) -> bool:
        """Every publish goes through here, and so through the telemetry seam."""
        exchange = exchange or self.outbox
        destination = routing_key if exchange in ("", self.outbox) else exchange  # the queue it is for
        kind = self.topology.kind(destination)
        outgoing = Published(destination, kind, headers, envelope)

        routed = True

        async def send() -> None:
            nonlocal routed
            if coalesce:
                routed = await self._coalescer(exchange, routing_key).send(body, outgoing.headers, properties)
            else:
                routed = await self._publish_now(body, outgoing.headers, properties, exchange, routing_key)

        await telemetry.publishing(outgoing, send)
        telemetry.emit("message.published", kind=kind)
        return routed

    async def _publish_now(self, body: bytes, headers: dict, properties: dict, exchange: str, routing_key: str) -> bool:
        message = aio_pika.Message(body, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                                   headers=headers, user_id=self.user, **properties)
        target = await self._exchange(exchange)
        confirmation = await target.publish(message, routing_key=routing_key)
        return not isinstance(confirmation, aiormq.abc.DeliveredMessage)  # mandatory: returned

    def _coalescer(self, exchange: str, routing_key: str) -> Coalescer:
        key = (exchange, routing_key)
        if key not in self._coalescers:
            self._coalescers[key] = Coalescer(functools.partial(self._publish_now, exchange=exchange,
                                                                routing_key=routing_key))
        return self._coalescers[key]

    async def publish_delayed(self, envelope: Envelope, routing_key: str, delay_s: float) -> None:
        """Delivers to `routing_key` after `delay_s`: the wait happens in RabbitMQ, not in a process."""
        delay_ms = round(delay_s * 10) * 100  # 100 ms steps bound the number of delay queues
        if delay_ms <= 0:
            return await self.publish(envelope, routing_key)
        queue = await self.topology.declare_delay_queue(self._channel, routing_key, delay_ms)
        await self.publish(envelope, queue)

    async def publish_raw(self, body: bytes, routing_key: str) -> None:
        await self._send(body, routing_key, "", {}, None, {})

    async def publish_many(self, messages: list[tuple[Envelope, str]]) -> None:
        """Publishes concurrently, so a batch waits for a few rounds of confirms rather than one per
        message; at most _PUBLISH_WINDOW at a time, which bounds the memory a large batch takes."""
        for start in range(0, len(messages), _PUBLISH_WINDOW):
            window = messages[start:start + _PUBLISH_WINDOW]
            await asyncio.gather(*(self.publish(env, key) for env, key in window))

    async def publish_topic(self, envelope: Envelope) -> None:
        """An event to the topics exchange, by its topic (the envelope's subject). A subscription queue
        that is full dead-letters it (reject-publish-dlx) and the broker nacks the publish: the event is
        then kept in the DLQ for replay, not lost, so that is no failure here."""
        try:
            await self.publish(envelope, envelope.subject, exchange=self.topology.topics)
        except aio_pika.exceptions.DeliveryError:
            log.warning("event %s (%s): a full subscription queue dead-lettered it", envelope.message_id,
                        envelope.subject)

    async def broadcast(self, envelope: Envelope) -> None:
        await self.publish(envelope, "", exchange=self.topology.control)

    async def dead_letter(self, message: AbstractIncomingMessage, reason: str, queue: str,
                          headers: dict | None = None, body: bytes | dict | None = None) -> None:
        """Parks a message in the DLQ with its reason; or, given `body` (and its `headers`), one
        message of the batch `message` is."""
        if self.restricted:
            # No write permission on the dead-letter exchange (a forged "expired in hold" letter would
            # fail someone's task): the broker dead-letters it, with "rejected" and its queue in x-death.
            # A batch goes whole: only the platform's aggregator is sent batches, and it is not restricted.
            log.warning("rejecting message from %s: %s", queue, reason)
            await settle(message, drop=True)
            return
        if body is None:
            headers, body = dict(message.headers or {}), message.body
        headers = {**(headers or {}), REASON_HEADER: reason[:1000], QUEUE_HEADER: queue}
        message_id = message.message_id
        if not isinstance(body, bytes):
            message_id, body = body.get("message_id") or message_id, orjson.dumps(body)
        await self._send(body[: self.settings.max_payload_bytes * 4], queue, self.topology.dlx, headers,
                         None, {"message_id": message_id, "content_type": message.content_type})

    async def consume(self, queues: str | list[str], handler: Handler, *, prefetch: int, raw: bool = False,
                      arguments: dict | None = None, paused: bool = False) -> Consumer:
        """Consumes existing queues; `prefetch` bounds the unacked messages of each queue's consumer
        (per consumer: RabbitMQ 4.3 refuses channel-wide QoS). With raw, the handler gets the AMQP
        message itself rather than a decoded envelope."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        names = [queues] if isinstance(queues, str) else queues
        # Declared (passively) rather than looked up: a robust channel restores the consumers of the queues
        # it declared, and only those, after the broker restarts.
        amqp_queues = [await channel.declare_queue(name, passive=True) for name in names]
        consumer = Consumer(self, channel, amqp_queues, handler, raw, arguments)
        if not paused:
            await consumer.start()
        return consumer

    async def consume_private(self, handler: Handler, *, name: str = "", bind_control: bool = False,
                              bind_events: bool = False, prefetch: int = 100) -> Consumer:
        # Consumer.stop() closes the channel, which deletes the queue: nothing is left behind.
        """A queue of this process alone, deleted when it disconnects: replies, the control fanout, or
        (bind_events) every stream event. Named after this process (topology.private_queue) unless `name`
        is given."""
        channel = await self.connection.channel()
        await channel.set_qos(prefetch_count=prefetch)
        kind = "control" if bind_control else "events" if bind_events else "reply"
        name = name or self.topology.private_queue(kind, self.source)
        # Stream events are notifications: should this process fall behind, the broker drops the oldest
        # rather than holding an unbounded backlog for it.
        arguments = {"x-max-length": 100_000, "x-overflow": "drop-head"} if bind_events else None
        amqp_queue = await channel.declare_queue(name, exclusive=True, auto_delete=True, arguments=arguments)
        if bind_control:
            await amqp_queue.bind(self.topology.control)
        if bind_events:
            await amqp_queue.bind(self.topology.events, routing_key="#")
        consumer = Consumer(self, channel, [amqp_queue], handler)
        await consumer.start()
        return consumer


def _count_reconnect(*_) -> None:
    telemetry.emit("amqp.reconnected")


def traceparent_of(headers: dict) -> str | None:
    """The W3C traceparent an AMQP message carries (the broker may hand header strings back as bytes)."""
    value = headers.get("traceparent")
    return value.decode("ascii", "replace") if isinstance(value, bytes) else value


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
