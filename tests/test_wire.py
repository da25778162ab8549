"""What a message costs on the wire: frames ready together go out in one write (switchboard.wire),
acks of a run of deliveries in one frame (bus.Acks), and messages published together to one queue in
one message (bus.Coalescer)."""

from __future__ import annotations

import asyncio
import random

import aiormq.abc
import aiormq.connection
import pytest

from switchboard import wire
from switchboard.bus import REASON_HEADER, Bus, Transient
from switchboard.protocol import Envelope, MessageType
from tests.harness import cleanup, wait_for


def frame(payload: bytes, *, drained: asyncio.Future | None = None, close: bool = False):
    return aiormq.abc.ChannelFrame(payload=payload, should_close=close, drain_future=drained)


async def test_frames_queued_together_are_joined_in_order_and_each_drained():
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    futures = [loop.create_future() for _ in range(3)]
    for i, future in enumerate(futures):
        queue.put_nowait(frame(b"f%d;" % i, drained=future))
    joined = await wire.CoalescingFrames(queue).__anext__()
    assert joined.payload == b"f0;f1;f2;" and not joined.should_close and joined.should_drain
    joined.drain()
    assert all(f.done() for f in futures) and queue.empty()


async def test_a_closing_frame_ends_the_batch_and_a_lone_frame_goes_as_it_is():
    queue: asyncio.Queue = asyncio.Queue()
    for item in (frame(b"a"), frame(b"close", close=True), frame(b"after")):
        queue.put_nowait(item)
    frames = wire.CoalescingFrames(queue)
    first = await frames.__anext__()
    assert first.payload == b"aclose" and first.should_close
    alone = await frames.__anext__()
    assert isinstance(alone, aiormq.abc.ChannelFrame) and alone.payload == b"after"


@pytest.fixture
async def bus(settings):
    """A connected bus, and a work queue of the test's own (deleted afterwards): bus.test_queue."""
    bus = Bus(settings, "wire-test")
    await bus.connect()
    bus.test_queue = bus.topology.capability_queue("wire")
    try:
        await bus.ensure_work_queue(bus.test_queue)
        yield bus
    finally:
        await bus.close()
        await cleanup(settings, {bus.test_queue}, redis=False)


async def consume_until(bus, handler, done, what: str, prefetch: int = 64) -> None:
    consumer = await bus.consume(bus.test_queue, handler, prefetch=prefetch)
    await wait_for(done, what=what)
    await consumer.stop()


async def test_a_burst_of_publishes_reaches_the_broker_whole_and_in_order(bus):
    assert wire.install() and aiormq.connection.FrameGenerator is wire.CoalescingFrames
    got: list[int] = []
    sent = [Envelope(type=MessageType.TASK, payload={"n": n, "pad": "x" * (n % 7) * 100}) for n in range(600)]
    # One publish at a time per task, all at once: the writer finds many frames queued each turn.
    await asyncio.gather(*(bus.publish(env, bus.test_queue) for env in sent))

    async def take(env: Envelope, message) -> None:
        got.append(env.payload["n"])

    await consume_until(bus, take, lambda: len(got) == 600, "all 600 messages consumed", prefetch=600)
    assert sorted(got) == list(range(600))  # none lost or garbled (a bad join breaks the framing)


async def test_acks_out_of_order_with_requeues_and_dead_letters_settle_each_message_once(bus):
    # Handlers finish in a shuffled order; every 10th message fails once (a Transient: requeued) and
    # every 25th is rejected by its handler (dead-lettered). An ack of a wrong or settled tag would close
    # the channel, and the broker would deliver everything unacked again: counted here as extra runs.
    runs: dict[int, int] = {}
    await asyncio.gather(*(bus.publish(Envelope(type=MessageType.TASK, payload={"n": n}), bus.test_queue)
                           for n in range(400)))
    delays = {n: random.random() * 0.02 for n in range(400)}

    async def handle(env: Envelope, message) -> None:
        n = env.payload["n"]
        runs[n] = runs.get(n, 0) + 1
        await asyncio.sleep(delays[n])
        if n % 25 == 0:
            raise ValueError("refused")  # dead-lettered, then acked
        if n % 10 == 0 and runs[n] == 1:
            raise Transient("once")  # nacked, requeued

    await consume_until(bus, handle, lambda: len(runs) == 400 and all(
        runs[n] == 2 for n in range(10, 400, 10) if n % 25), "every message handled, the failing ones twice")
    assert await bus.queue_depth(bus.test_queue) == 0  # nothing left unacked and requeued at the close
    assert {n: c for n, c in runs.items() if c != (2 if n % 10 == 0 and n % 25 else 1)} == {}


async def test_coalesced_messages_arrive_as_few_batches_each_with_its_own_headers(bus):
    seen: dict[int, str] = {}
    carriers: set[str] = set()
    envs = [Envelope(type=MessageType.RESULT, payload={"n": n}) for n in range(300)]
    await asyncio.gather(*(bus.publish(env, bus.test_queue, headers={"traceparent": f"00-{n:032x}-{n:016x}-01"},
                                       coalesce=True) for n, env in enumerate(envs)))

    async def take(env: Envelope, message) -> None:
        seen[env.payload["n"]] = env.traceparent
        carriers.add(message.message_id)

    await consume_until(bus, take, lambda: len(seen) == 300, "all 300 messages handled")
    assert all(seen[n] == f"00-{n:032x}-{n:016x}-01" for n in range(300))
    assert len(carriers) < 300 // 4  # one in flight at a time: the rest went together


async def test_a_bad_message_in_a_batch_is_dead_lettered_alone_and_a_transient_one_retries_the_batch(bus):
    runs: dict[int, int] = {}
    good = [Envelope(type=MessageType.RESULT, payload={"n": n}).encode() for n in range(3)]
    body = b"[" + b",".join([b'[{},' + e + b']' for e in good] + [b'[{},{"type":"nonsense"}]']) + b"]"
    await bus._publish_now(body, {wire.BATCH_HEADER: 4}, {"message_id": "batch-1"}, "", bus.test_queue)

    async def take(env: Envelope, message) -> None:
        n = env.payload["n"]
        runs[n] = runs.get(n, 0) + 1
        if n == 1 and runs[n] == 1:
            raise Transient("not yet")

    await consume_until(bus, take, lambda: runs.get(1) == 2, "the batch requeued and handled again", prefetch=8)
    letters = []
    dlq = await (await bus.connection.channel()).get_queue(bus.topology.dlq)
    while (letter := await dlq.get(fail=False)) is not None:
        letters.append(letter)
        await letter.ack()
    assert runs == {0: 2, 1: 2, 2: 2}  # the batch was tried again whole, once
    bad = [m for m in letters if m.headers.get(wire.BATCH_HEADER) is None and b"nonsense" in m.body]
    assert len(bad) == 1 and b'"type":"nonsense"' in bad[0].body  # that one alone, as its own message
    assert "unparseable message" in bad[0].headers[REASON_HEADER]
