"""What a message costs on the wire: fewer socket writes, ack frames and broker messages.

- Frames ready together go out in one socket write (install(): CoalescingFrames).
- A consumer channel acks each run of settled deliveries with one frame (Acks, through settle()).
- Messages published together to one queue may go as one message (Coalescer, batch_items()).

Socket writes. aiormq's connection writer takes its frames one at a time from the connection's write queue and writes
each to the socket: a syscall, and a TCP segment for the broker to read, per publish and per ack. An
agent that finishes sixteen tasks in one turn of the event loop queues sixteen results and sixteen acks
at once; sending them as one write is what took about a fifth of an agent's CPU. So the writer's frame
source is replaced by one that, after each frame, takes every frame already queued (up to MAX_FRAMES)
and hands the writer their bytes joined, as one frame. Order is kept; a frame that closes the connection
ends a batch (it is the last thing the writer sends); each frame's drain is signalled once the joined
write drained, as it would be alone.

It reaches into aiormq's writer (its FrameGenerator), checked at install: with an aiormq whose writer
is not the one this knows, nothing is replaced and the frames go one by one, as before.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import Awaitable, Callable

import aio_pika
import aiormq.abc
import aiormq.connection
import orjson
from aio_pika.abc import AbstractIncomingMessage

from switchboard.protocol import new_id

log = logging.getLogger(__name__)

MAX_FRAMES = 256  # bounds one write: 256 publishes of a few KB at most
# An ack that finds its channel closed: the broker requeues what the channel held, so nothing is lost.
CHANNEL_GONE = (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError,
                aiormq.exceptions.ChannelInvalidStateError, ConnectionError)


class JoinedFrames:
    """Several ChannelFrames as the writer sees one: their payloads joined, drained together."""

    __slots__ = ("frames", "payload", "should_close")

    def __init__(self, frames: list):
        self.frames = frames
        self.payload = b"".join(f.payload for f in frames)
        self.should_close = any(f.should_close for f in frames)

    @property
    def should_drain(self) -> bool:
        return any(f.should_drain for f in self.frames)

    def drain(self) -> None:
        for frame in self.frames:
            frame.drain()


class CoalescingFrames(aiormq.connection.FrameGenerator):
    async def __anext__(self):
        frame = await super().__anext__()
        if self.queue.empty() or frame.should_close:
            return frame
        frames = [frame]
        while len(frames) < MAX_FRAMES and not self.queue.empty():
            frame = self.queue.get_nowait()
            self.queue.task_done()
            frames.append(frame)
            if frame.should_close:
                break
        return JoinedFrames(frames)


def install() -> bool:
    """Makes every aiormq connection opened from now on coalesce its writes; True if it could."""
    if aiormq.connection.FrameGenerator is CoalescingFrames:
        return True
    generator = aiormq.connection.FrameGenerator
    frame = aiormq.abc.ChannelFrame
    known = (getattr(generator, "__anext__", None) is not None and hasattr(frame, "should_drain")
             and "payload" in getattr(frame, "__dataclass_fields__", {}))
    if not known:
        log.warning("aiormq %s: its writer is not the one switchboard.wire knows; frames go one by one",
                    getattr(aiormq, "__version__", "?"))
        return False
    aiormq.connection.FrameGenerator = CoalescingFrames
    return True


BATCH_HEADER = "x-switchboard-batch"  # the message carries this many messages (Coalescer)
BATCH_MESSAGES = 64
BATCH_BYTES = 256_000


class Coalescer:
    """Messages for one queue, sent as few: one message is in flight at a time, and those published
    while it is join the next. A lone message goes as it is; several go as one message with
    BATCH_HEADER, whose body is a JSON array of [headers, envelope] pairs, each message's own. So at low
    load nothing waits, and under load the broker handles one message for many: its work is per message
    far more than per byte. Every caller waits for the broker's confirm of the message that carried
    its own. The batch is bounded by BATCH_MESSAGES and BATCH_BYTES (a larger message goes alone), the
    queue by the callers, who each wait."""

    def __init__(self, publish: Callable[[bytes, dict, dict], Awaitable[bool]]):
        self._publish = publish
        self._waiting: list[tuple[bytes, dict, dict, asyncio.Future]] = []
        self._sender: asyncio.Task | None = None

    async def send(self, body: bytes, headers: dict, properties: dict) -> bool:
        sent = asyncio.get_running_loop().create_future()
        self._waiting.append((body, headers, properties, sent))
        if self._sender is None:
            self._sender = asyncio.ensure_future(self._run())
        return await asyncio.shield(sent)

    async def _run(self) -> None:
        try:
            while self._waiting:
                n = batch_length([len(body) for body, *_ in self._waiting[:BATCH_MESSAGES]], BATCH_BYTES)
                batch, self._waiting = self._waiting[:n], self._waiting[n:]
                try:
                    if n == 1:
                        routed = await self._publish(*batch[0][:3])
                    else:
                        body = orjson.dumps([[headers, orjson.Fragment(item)] for item, headers, _, _ in batch])
                        routed = await self._publish(body, {BATCH_HEADER: n}, {
                            "content_type": "application/json", "message_id": new_id(), "type": "batch"})
                except BaseException as exc:
                    if not isinstance(exc, Exception):  # cancelled (a shutdown): nobody waits in vain
                        batch, self._waiting = batch + self._waiting, []
                    for *_, sent in batch:
                        if not sent.done():
                            sent.set_exception(exc if isinstance(exc, Exception) else ConnectionError("closing"))
                            sent.exception()  # retrieved: a caller that was cancelled no longer asks
                    if not isinstance(exc, Exception):
                        raise
                    continue
                for *_, sent in batch:
                    if not sent.done():
                        sent.set_result(routed)
        finally:
            self._sender = None


def batch_length(sizes: list[int], max_bytes: int) -> int:
    """How many of the items waiting (their sizes in bytes) the next batch takes: at least one, and no
    more than fit in max_bytes."""
    total = 0
    for n, size in enumerate(sizes):
        total += size
        if n and total > max_bytes:
            return n
    return len(sizes)


def batch_items(body: bytes) -> list[tuple[dict, dict]]:
    items = orjson.loads(body)
    if not isinstance(items, list) or not items or not all(
            isinstance(i, list) and len(i) == 2 and isinstance(i[0], dict) and isinstance(i[1], dict) for i in items):
        raise ValueError("a batch is a non-empty list of [headers, envelope] pairs")
    return [(headers, envelope) for headers, envelope in items]


class Acks:
    """A consumer channel's acks, sent as one basic.ack(multiple=True) for each run of settled
    deliveries rather than one frame per message: the broker handles one ack, not sixteen.

    Deliveries are noted in the order the channel got them. A settled one (acked, nacked, rejected)
    that begins the run of open ones lets the run move on, and the highest acked tag reached is acked
    "up to and including" at the end of this turn of the event loop. Nacks and rejects go at once, each
    alone; a multiple ack never ends on one of them. Every settlement of a consumer's message goes
    through here (`settle`), so no tag is acked twice. A channel that the robust connection replaced
    starts afresh: messages of the old one are settled one by one, and fail as they would have."""

    def __init__(self, channel):
        self._channel = channel  # aiormq's channel, whose delivery tags these are
        self._open: collections.deque[int] = collections.deque()  # noted and unsettled, in delivery order
        self._settled: set[int] = set()  # settled, but behind an open one
        self._refused: set[int] = set()  # of those, the nacked and rejected: no multiple ack ends on one
        self._acked_to = 0  # the highest tag acked (or to ack) so far; every tag up to it has left _open
        self._sent_to = 0
        self._sending: asyncio.Task | None = None

    def note(self, message: AbstractIncomingMessage) -> None:
        self._open.append(message.delivery_tag)

    def settled(self, message: AbstractIncomingMessage) -> bool:
        tag = message.delivery_tag
        return message.processed or tag <= self._acked_to or tag in self._settled

    async def ack(self, message: AbstractIncomingMessage) -> None:
        self._done(message.delivery_tag, acked=True)

    async def nack(self, message: AbstractIncomingMessage, *, requeue: bool) -> None:
        await message.nack(requeue=requeue)
        self._done(message.delivery_tag, acked=False)

    async def reject(self, message: AbstractIncomingMessage) -> None:
        await message.reject()
        self._done(message.delivery_tag, acked=False)

    def _done(self, tag: int, *, acked: bool) -> None:
        self._settled.add(tag)
        if not acked:
            self._refused.add(tag)
        while self._open and self._open[0] in self._settled:
            head = self._open.popleft()
            self._settled.discard(head)
            if head in self._refused:
                self._refused.discard(head)
            else:
                self._acked_to = head
        if self._acked_to > self._sent_to and self._sending is None:
            self._sending = asyncio.ensure_future(self._send())

    async def _send(self) -> None:
        try:
            await asyncio.sleep(0)  # what else settles in this turn joins the ack
            while self._acked_to > self._sent_to:
                upto = self._acked_to
                await self._channel.basic_ack(delivery_tag=upto, multiple=True)
                self._sent_to = upto
        except CHANNEL_GONE:
            pass  # the channel is gone, and with it its deliveries: the broker requeues them
        finally:
            self._sending = None

    async def flush(self) -> None:
        if self._sending is not None:
            await asyncio.gather(self._sending, return_exceptions=True)


# Each consumer channel's Acks, by aiormq channel: a handler settles its message through settle().
channel_acks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


async def settle(message: AbstractIncomingMessage, *, requeue: bool = False, drop: bool = False) -> None:
    """Acks a consumed message (or nacks it to be requeued, or rejects it, dropping or dead-lettering
    it), unless it was settled already: the one way this code settles a message."""
    acks = channel_acks.get(message.channel)
    if acks is None:
        if not message.processed:
            await (message.nack(requeue=True) if requeue else message.reject() if drop else message.ack())
    elif not acks.settled(message):
        await (acks.nack(message, requeue=True) if requeue else acks.reject(message) if drop else acks.ack(message))
