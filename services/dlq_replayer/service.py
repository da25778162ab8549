"""Keeps dead letters inspectable: moves each message of the dead-letter queue into the state store,
with its reason, so the api can list them."""

from __future__ import annotations

from aio_pika.abc import AbstractIncomingMessage

from switchboard.bus import QUEUE_HEADER, REASON_HEADER
from switchboard.deadletters import DeadLetters
from switchboard.runtime import Service


class DlqReplayer(Service):
    name = "dlq_replayer"
    default_port = 8105
    uses_store = True

    async def setup(self) -> None:
        self.dead_letters = DeadLetters(self.store, self.settings)
        # Dead letters are raw messages, often not envelopes at all.
        await self.consume(self.bus.topology.dlq, self.keep, prefetch=64, raw=True)

    async def keep(self, message: AbstractIncomingMessage) -> None:
        headers = dict(message.headers or {})
        reason = str(headers.get(REASON_HEADER) or _x_death_reason(headers) or "unknown")
        queue = str(headers.get(QUEUE_HEADER) or message.routing_key or "")
        await self.dead_letters.add(reason=reason, queue=queue, body=message.body, headers=headers,
                                    message_id=message.message_id)


def _x_death_reason(headers: dict) -> str | None:
    deaths = headers.get("x-death") or []
    if deaths:
        first = deaths[0]
        return f"{first.get('reason')} in {first.get('queue')}"
    return None
