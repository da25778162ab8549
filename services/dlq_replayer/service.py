"""Keeps dead letters inspectable and replays them.

Every message of the dead-letter queue goes into the state store with its reason. A task that expired
in a hold queue (no live agent took it in time) also fails there, in the same transaction, so its
workflow does not wait for it forever. Replay requests (by id, or by filter) come from the api and are
carried out at a bounded rate: a replayed task resumes its workflow; any other message is published
again to the queue it came from.
"""

from __future__ import annotations

import asyncio
import logging

from aio_pika.abc import AbstractIncomingMessage

from switchboard import stream, telemetry
from switchboard.bus import QUEUE_HEADER, REASON_HEADER, traceparent_of
from switchboard.deadletters import FILTERS, DeadLetters, make_record
from switchboard.protocol import Envelope, MessageType
from switchboard.runtime import Service
from switchboard.workflows import NotFound, NotReplayable, WorkflowStore

log = logging.getLogger(__name__)

MAX_REPLAY_RATE = 100.0
COUNT_S = 5.0


class DlqReplayer(Service):
    name = "dlq_replayer"
    default_port = 8105
    uses_store = True

    async def setup(self) -> None:
        self.dead_letters = DeadLetters(self.store, self.settings)
        self.workflows = WorkflowStore(self.store, self.settings)
        # Dead letters are raw messages, often not envelopes at all.
        await self.consume(self.bus.topology.dlq, self.keep, prefetch=64, raw=True)
        await self.consume(self.bus.topology.replay, self.replay, prefetch=1)
        self.every(COUNT_S, self._count, "dead-letter count")

    async def _count(self) -> None:
        telemetry.emit("dead_letters.counted", counts=await self.dead_letters.count_dead())

    async def keep(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        reason = str(headers.get(REASON_HEADER) or _x_death_reason(headers) or "unknown")
        queue = str(headers.get(QUEUE_HEADER) or _x_death_queue(headers) or message.routing_key or "")
        if queue.startswith(self.bus.topology.hold_queue("")):
            try:
                task = Envelope.decode(message.body)
            except ValueError:
                task = None
            if task is not None and task.type == MessageType.TASK:
                task.traceparent = traceparent_of(headers)  # the trace of the workflow it belongs to
                capability = task.payload.get("capability")
                why = (f"no live agent took it within {self.settings.unroutable_after_s:g}s "
                       f"(capability {capability!r})")
                await (await self.workflows.dead_letter_task(task, why)).publish(self.bus)
                return
        record = make_record(reason=reason, queue=queue, body=message.body, headers=headers,
                             message_id=message.message_id)
        await self.dead_letters.add(record)
        await stream.publish(self.bus, [stream.dead_letter_change(record, "added")])

    async def replay(self, env: Envelope, message) -> None:
        """{"ids": [...]} or {"filter": {...}, "limit": n}, at most `rate_per_s` replays a second."""
        rate = min(float(env.payload.get("rate_per_s") or 10.0), MAX_REPLAY_RATE)
        ids = env.payload.get("ids")
        if ids is None:
            filters = {k: v for k, v in (env.payload.get("filter") or {}).items() if k in FILTERS}
            records = await self.dead_letters.list(limit=int(env.payload.get("limit") or 1000),
                                                   **{"status": "dead", **filters})
            ids = [r["id"] for r in records]
        done = 0
        for dl_id in ids:
            try:
                await (await self.workflows.replay(dl_id)).publish(self.bus)
                done += 1
            except (NotFound, NotReplayable) as exc:
                log.info("not replaying %s: %s", dl_id, exc)
            await asyncio.sleep(1.0 / rate)  # pacing, so a replay storm cannot flood the agents
        log.info("replayed %d of %d dead letters", done, len(ids))


def _x_death_reason(headers: dict) -> str | None:
    deaths = headers.get("x-death") or []
    return f"{deaths[0].get('reason')} in {deaths[0].get('queue')}" if deaths else None


def _x_death_queue(headers: dict) -> str | None:
    deaths = headers.get("x-death") or []
    return str(deaths[0].get("queue")) if deaths else None
